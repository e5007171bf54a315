"""The image, built with podman and run as ECS runs it.

Read-only root filesystem, every capability dropped, no new privileges, a non-root user, the
secrets in environment variables; host networking, so that the container reaches moto and the
SSH git host on 127.0.0.1 (never a bridge network). A real `git push` becomes a StartBuild
through the SSH fetch inside the container, the image's own HEALTHCHECK passes, and
`podman stop` (SIGTERM) lets the job in flight finish: the container exits 0 by itself.

The image is built by `deploy/build-image.sh` (what `make image` runs; a cache hit when
nothing changed). `make test` installs podman first (`make image-deps`).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aioboto3
import aiohttp
import anyio
import pytest

from localdev.githost import codecommit_event
from tests.conftest import free_port
from tests.helpers import ROOT, AwsResources, GitWorld, WorkCopy, create_project, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

IMAGE = "branchbuild:dev"
PODMAN = ["podman", "--runtime", "runc"]
# podman's default ulimits for root are above this machine's hard limits (runc then fails
# with "error setting rlimits"); these are well above what the service needs.
ULIMITS = ["--ulimit", "nofile=16384:16384", "--ulimit", "nproc=8192:8192"]
UID = 10001  # the image's USER
StartContainer = Callable[..., Awaitable["Container"]]


@pytest.fixture(scope="session")
def image() -> str:
    """The image of this working tree, built (or found in podman's layer cache) once."""
    if shutil.which("podman") is None:
        pytest.fail("podman is missing: `make image-deps` installs it (as `make test` does)")
    build = subprocess.run(
        ["bash", str(ROOT / "deploy" / "build-image.sh"), IMAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    if build.returncode != 0:
        pytest.fail(f"the image did not build:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}")
    return IMAGE


async def podman(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    result = await anyio.run_process([*PODMAN, *args], env=env, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed: {result.stderr.decode()}")
    return result.stdout.decode()


class Container:
    """One detached container, removed (with its anonymous volumes) at the end."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port

    async def inspect(self) -> dict[str, Any]:
        [state] = json.loads(await podman("container", "inspect", self.name))
        return dict(state)

    async def logs(self) -> str:
        result = await anyio.run_process(
            [*PODMAN, "logs", self.name], stderr=subprocess.STDOUT, check=False
        )
        return result.stdout.decode(errors="replace")

    async def readyz(self) -> int:
        if (await self.inspect())["State"]["Status"] == "exited":
            raise RuntimeError(f"the container exited:\n{await self.logs()}")
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{self.port}/readyz") as reply:
                    return reply.status
        except aiohttp.ClientError:
            return 0


async def proc_status(pid: int) -> dict[str, str]:
    """The kernel's view of a process of the container (/proc on the host)."""
    lines = (await anyio.Path(f"/proc/{pid}/status").read_text()).splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


async def mount_options(pid: int) -> dict[str, list[str]]:
    """Each mount point the process sees, with its per-mount options (ro, rw, ...)."""
    text = await anyio.Path(f"/proc/{pid}/mountinfo").read_text()
    return {fields[4]: fields[5].split(",") for fields in map(str.split, text.splitlines())}


def run_command(image: str, name: str, env: dict[str, str]) -> list[str]:
    """`podman run`, hardened as the ECS task definition is (deploy/service.yaml)."""
    return [
        *PODMAN,
        "run",
        "--detach",
        "--name",
        name,
        "--network=host",
        "--read-only",
        "--read-only-tmpfs=false",  # only what is listed below is writable
        "--mount=type=tmpfs,destination=/data,tmpfs-mode=0750,chown=true",
        "--mount=type=tmpfs,destination=/tmp,tmpfs-mode=1777",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        *ULIMITS,
        # Values come from podman's environment, never from its command line.
        *(f"--env={key}" for key in sorted(env)),
        image,
    ]


@pytest.fixture
def container_names() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run([*PODMAN, "rm", "--force", "--volumes", name], capture_output=True)


@pytest.fixture
async def start_container(
    image: str, aws: AwsResources, git_world: GitWorld, container_names: list[str]
) -> AsyncIterator[StartContainer]:
    async def start(**overrides: str) -> Container:
        port = free_port()
        env = {
            key: os.environ[key]
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
        } | {
            "AWS_ENDPOINT_URL": aws.endpoint,
            "BRANCHBUILD_QUEUE_URL": aws.intake_url,
            "BRANCHBUILD_WORK_QUEUE_URL": aws.work_url,
            "BRANCHBUILD_BUCKET": aws.bucket,
            "BRANCHBUILD_GIT_URL_TEMPLATE": git_world.url_template,
            "BRANCHBUILD_SSH_PRIVATE_KEY": git_world.key.read_text(),
            "BRANCHBUILD_KNOWN_HOSTS": git_world.known_hosts.read_text(),
            "BRANCHBUILD_HTTP_HOST": "127.0.0.1",
            "BRANCHBUILD_HTTP_PORT": str(port),
            "BRANCHBUILD_WAIT_TIME": "2",
            "BRANCHBUILD_LOG_FORMAT": "json",
        }
        env |= overrides
        name = f"branchbuild-test-{uuid.uuid4().hex[:8]}"
        container_names.append(name)
        command = run_command(image, name, env)
        result = await anyio.run_process(command, env=dict(os.environ) | env, check=False)
        assert result.returncode == 0, result.stderr.decode()
        return Container(name, port)

    yield start


async def test_the_image_builds_a_push_hardened_healthy_and_drains_on_stop(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_container: StartContainer
) -> None:
    await create_project(aws, "shop")
    repo = await WorkCopy.create(git_world, tmp_path, "shop")
    await repo.commit({"README.md": "# shop\n"})
    await repo.push("main")
    await repo.checkout("feature/in-a-container")
    commit = await repo.commit({"app.py": "print('hi')\n"})
    await repo.push("feature/in-a-container")
    gate = anyio.Event()
    git_world.host.upload_pack_gate = gate  # holds the container's fetch until set
    container = await start_container(BRANCHBUILD_SHUTDOWN_GRACE="60")

    async def ready() -> bool:
        return await container.readyz() == 200

    await wait_for(ready, within=60, what="the container's readiness")

    # Hardened as the task definition says, seen from the kernel: tini (PID 1) and the
    # service run as the image's user with no capabilities and no way to gain privileges,
    # on a read-only root filesystem.
    pid = (await container.inspect())["State"]["Pid"]
    children = (await anyio.Path(f"/proc/{pid}/task/{pid}/children").read_text()).split()
    assert len(children) == 1  # the service, under tini
    for process in (pid, int(children[0])):
        status = await proc_status(process)
        assert status["Uid"].split() == [str(UID)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(UID)] * 4, status["Gid"]
        for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[capabilities], 16) == 0, capabilities
        assert status["NoNewPrivs"] == "1"
    mounts = await mount_options(pid)
    assert "ro" in mounts["/"]
    assert "rw" in mounts["/data"] and "rw" in mounts["/tmp"]
    # Nothing to install or compile with at run time.
    tools = await podman("exec", container.name, "sh", "-c", "command -v pip pip3 gcc cc || true")
    assert tools.strip() == ""

    # The image's own HEALTHCHECK (kept by --format docker), run by podman.
    config = (await container.inspect())["Config"]["Healthcheck"]
    assert config["Test"] == ["CMD", "branchbuild", "healthcheck"]
    await podman("healthcheck", "run", container.name)  # exit status 0: healthy
    assert (await container.inspect())["State"]["Health"]["Status"] == "healthy"

    # A real push, fetched over SSH from inside the container: held at the git host.
    await aws.send_event(codecommit_event(git_world.changes[-1]))

    async def fetching() -> bool:
        return git_world.host.upload_pack_waiting == 1

    await wait_for(fetching, within=60, what="the container's fetch")

    # `podman stop` sends the image's STOPSIGNAL (SIGTERM) and SIGKILLs after 90 s: the job in
    # flight finishes within the service's 60 s grace and the container exits 0 by itself.
    async with anyio.create_task_group() as group:
        group.start_soon(podman, "stop", "--time", "90", container.name)

        async def draining() -> bool:
            return await container.readyz() == 503

        await wait_for(draining, within=30, what="draining")
        gate.set()
    state = (await container.inspect())["State"]
    assert state["Status"] == "exited"
    assert state["ExitCode"] == 0, await container.logs()

    [request] = await aws.start_builds()
    assert request["projectName"] == "shop"
    key = f"shop/feature/in-a-container/{commit}.zip"
    assert request["sourceLocationOverride"] == f"{aws.bucket}/{key}"
    assert {"name": "COMMIT_ID", "value": commit, "type": "PLAINTEXT"} in request[
        "environmentVariablesOverride"
    ]
    assert await aws.object(key)
    assert await aws.count(aws.work_url) == 0
    logs = [json.loads(line) for line in (await container.logs()).splitlines() if line[:1] == "{"]
    messages = [entry["message"] for entry in logs]
    # The job in flight at SIGTERM finished after it (the gate opened once readiness fell).
    stopping = messages.index("SIGTERM: stopping; in-flight jobs get 60.0 s")
    started = [i for i, message in enumerate(messages) if message.startswith("started build")]
    assert len(started) == 1 and started[0] > stopping, messages
    assert messages[-1] == "stopped"
    assert git_world.key.read_text().strip().splitlines()[1] not in "\n".join(messages)


async def test_the_image_refuses_a_bad_configuration_with_one_line(
    aws: AwsResources, start_container: StartContainer
) -> None:
    container = await start_container(BRANCHBUILD_CONCURRENCY="lots")

    async def exited() -> dict[str, Any] | None:
        state: dict[str, Any] = (await container.inspect())["State"]
        return state if state["Status"] == "exited" else None

    state = await wait_for(exited, within=60, what="the container to exit")
    assert state["ExitCode"] == 2
    assert (await container.logs()).strip() == (
        "branchbuild: configuration error: BRANCHBUILD_CONCURRENCY: Input should be a valid "
        "integer, unable to parse string as an integer (got 'lots')"
    )


_LIST_MODULES = """
import pkgutil, service
print(" ".join(sorted(m.name for m in pkgutil.iter_modules())))
print(" ".join(sorted(m.name for m in pkgutil.walk_packages(service.__path__, "service."))))
"""


async def test_the_image_holds_the_service_and_no_development_code(image: str) -> None:
    """The modules the image can import: the service's, and none of the development package
    (the local stack, the stand-ins, the local build backend) or the test tools."""
    listing = await podman(
        "run", "--rm", "--network=host", *ULIMITS, "--entrypoint", "/opt/venv/bin/python",
        image, "-c", _LIST_MODULES,
    )  # fmt: skip
    top_level, service_modules = (line.split() for line in listing.strip().splitlines())
    assert "service" in top_level and "aioboto3" in top_level
    assert {"localdev", "asyncssh", "moto", "pytest", "hypothesis", "tests"} & set(
        top_level
    ) == set()
    assert "service.worker" in service_modules and "service.admin.dlq" in service_modules
    assert [m for m in service_modules if "localdev" in m] == []


async def test_the_image_pipeline_template_exports_the_repository_and_reads_only_its_source(
    moto_endpoint: str,
) -> None:
    """deploy/image-pipeline.yaml in moto's CloudFormation (which creates no CodeBuild project
    and ignores ECR's scan and lifecycle settings: `make lint-deploy` checks those)."""
    body = (ROOT / "deploy" / "image-pipeline.yaml").read_text()
    session = aioboto3.Session()
    async with (
        session.client("cloudformation", endpoint_url=moto_endpoint) as cloudformation,
        session.client("ecr", endpoint_url=moto_endpoint) as ecr,
        session.client("iam", endpoint_url=moto_endpoint) as iam,
    ):
        grants = {}
        for source_type, location in (
            ("CODECOMMIT", "https://git-codecommit.eu-west-1.amazonaws.com/v1/repos/bb-src"),
            ("GITHUB", "https://github.com/example/branchbuild.git"),
        ):
            suffix = uuid.uuid4().hex[:8]
            stack = f"image-{suffix}"
            await cloudformation.create_stack(
                StackName=stack,
                TemplateBody=body,
                Parameters=[
                    {"ParameterKey": "ImageRepositoryName", "ParameterValue": f"bb-{suffix}"},
                    {"ParameterKey": "SourceType", "ParameterValue": source_type},
                    {"ParameterKey": "SourceLocation", "ParameterValue": location},
                ],
                Capabilities=["CAPABILITY_IAM"],
            )
            [described] = (await cloudformation.describe_stacks(StackName=stack))["Stacks"]
            assert described["StackStatus"] == "CREATE_COMPLETE"
            exports = {
                e["Name"]: e["Value"] for e in (await cloudformation.list_exports())["Exports"]
            }
            [repository] = (await ecr.describe_repositories(repositoryNames=[f"bb-{suffix}"]))[
                "repositories"
            ]
            assert exports[f"{stack}-ImageRepositoryUri"] == repository["repositoryUri"]
            assert exports[f"{stack}-ImageRepositoryArn"] == repository["repositoryArn"]
            assert repository["imageTagMutability"] == "IMMUTABLE"
            [role] = [
                r
                for r in (await iam.list_roles())["Roles"]
                if r["RoleName"].startswith(f"{stack}-BuildRole")
            ]
            [policy_name] = (await iam.list_role_policies(RoleName=role["RoleName"]))["PolicyNames"]
            document = (
                await iam.get_role_policy(RoleName=role["RoleName"], PolicyName=policy_name)
            )["PolicyDocument"]
            # moto's CloudFormation keeps an inline policy as the repr of its document, and
            # an `!If [..., AWS::NoValue]` statement as None.
            statements = document if isinstance(document, dict) else ast.literal_eval(document)
            grants[source_type] = {s["Sid"]: s for s in statements["Statement"] if s}
            assert grants[source_type]["PushImage"]["Resource"] == repository["repositoryArn"]
    assert grants["CODECOMMIT"]["ReadSource"] == {
        "Sid": "ReadSource",
        "Effect": "Allow",
        "Action": "codecommit:GitPull",
        "Resource": "arn:aws:codecommit:eu-west-1:123456789012:bb-src",
    }
    assert "ReadSource" not in grants["GITHUB"]
