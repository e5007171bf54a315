"""Shared fixtures: an isolated AWS environment, a moto server over HTTP, real queues."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Literal

import aioboto3
import aiohttp
import anyio
import pytest

from localdev.githost import GitHost
from service.events import RefChange
from tests.helpers import (
    CALLS_DIR,
    AwsResources,
    GitWorld,
    ServiceProcess,
    StartService,
    calls_directory,
    create_resources,
    record_calls_of,
    recorded_logs,
    server_process,
    service_env,
)

REGION = "eu-west-1"


def free_port() -> int:
    """A port that was free a moment ago: only for what cannot bind port 0 and report its
    own (LocalStack, and `make run`'s command line in tests/test_localstack.py). moto, the git
    host and the service bind port 0 and report theirs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- running in parallel (pytest-xdist, --dist loadgroup) -----------------------------------------

# Tests that share a costly session or module fixture run on one worker (one LocalStack, one
# image, one benchmark smoke run): each worker would otherwise make its own.
_GROUPS = {"localstack_endpoint": "localstack", "image": "image", "results": "bench"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the marks into node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, group in _GROUPS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))


# -- the IAM proof of the run's AWS calls (tests/test_iam.py), once every test is over ------------

SCENARIO = "tests/test_iam.py::test_every_aws_call_is_allowed_and_every_grant_is_used"
_run: dict[str, int | str] = {"deselected": 0, "scenario": "", "proof": ""}


def pytest_configure(config: pytest.Config) -> None:
    """The run's calls directory, made by the controller (or the only process): xdist's
    workers and the service processes they start inherit it through the environment."""
    if not hasattr(config, "workerinput"):
        os.environ[CALLS_DIR] = tempfile.mkdtemp(prefix="branchbuild-aws-calls-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ.pop(CALLS_DIR, ""), ignore_errors=True)


def pytest_deselected(items: list[pytest.Item]) -> None:
    _run["deselected"] = int(_run["deselected"]) + len(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    """What this process runs (each xdist worker collects the whole selection): that every
    grant is used can be checked only when the run is the whole suite."""
    if not session.items:  # xdist's controller collects nothing itself
        return
    selection = {
        "modules": sorted({item.path.name for item in session.items}),
        "deselected": _run["deselected"],
    }
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (Path(os.environ[CALLS_DIR]) / f"selection-{worker}.json").write_text(json.dumps(selection))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid.split("@")[0] == SCENARIO and (
        report.when == "call" or report.outcome != "passed"
    ):
        _run["scenario"] = report.outcome


def _partial(session: pytest.Session) -> str:
    """Why this run is not the whole suite (so unused grants cannot be told), or ''."""
    directory = Path(os.environ[CALLS_DIR])
    suite = {path.name for path in Path(__file__).parent.glob("test_*.py")}
    selections = [json.loads(p.read_text()) for p in directory.glob("selection-*.json")]
    ran = {name for selection in selections for name in selection["modules"]}
    if not suite <= ran:
        return f"{len(suite - ran)} test module(s) not run"
    if any(selection["deselected"] for selection in selections):
        return "tests deselected (-k, -m or --deselect)"
    if session.testsfailed:
        return f"{session.testsfailed} test(s) failed"
    return ""


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On the controller (or the only process), after every test of every worker: prove the
    run's AWS calls (tests/test_iam.py ``prove``), reported as one more test result."""
    if hasattr(session.config, "workerinput") or session.shouldstop:
        return
    if _run["scenario"] != "passed":  # not selected, or its failure is reported already
        logs = recorded_logs(Path(os.environ[CALLS_DIR]))
        if logs:  # never silently: say whose calls went unchecked
            why = "was not selected" if not _run["scenario"] else "did not pass"
            _run["proof"] = (
                f"NOT run: the AWS calls of {len(logs)} recorded process(es) were not "
                f"evaluated ({SCENARIO} {why})"
            )
        return
    from tests.test_iam import prove

    started = time.monotonic()
    outcome: Literal["passed", "failed"] = "passed"
    longrepr = None
    try:
        _run["proof"] = prove(Path(os.environ[CALLS_DIR]), partial=_partial(session))
    except AssertionError as failure:
        _run["proof"] = "FAILED (tests/test_iam.py::IAM proof, above)"
        outcome, longrepr = "failed", f"{type(failure).__name__}: {failure}"
    report = pytest.TestReport(
        "tests/test_iam.py::IAM proof",
        ("tests/test_iam.py", None, "IAM proof"),
        {},
        outcome,
        longrepr,
        "call",
        duration=time.monotonic() - started,
    )
    session.config.hook.pytest_runtest_logreport(report=report)
    if outcome == "failed":
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not hasattr(terminalreporter.config, "workerinput") and _run["proof"]:
        terminalreporter.write_sep("-", "IAM proof")
        terminalreporter.write_line(str(_run["proof"]), bold=True)


@pytest.fixture(autouse=True)
def isolated_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ~/.aws, no stray AWS_* variables: every test talks only to its own emulator."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "BRANCHBUILD_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real moto server on 127.0.0.1, over HTTP, with its request recorder on."""
    workdir = tmp_path_factory.mktemp("moto")  # the recorder writes its file here
    log = workdir / "moto.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BRANCHBUILD_"))} | {
        "MOTO_ENABLE_RECORDING": "True",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    # moto.server with FIFO groups made exclusive (tests/motoserver.py says why).
    command = [sys.executable, "-m", "tests.motoserver", "-H", "127.0.0.1", "-p", "0"]
    health = "http://127.0.0.1:{port}/moto-api/data.json"
    running = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")
    with server_process(
        command, env=env, health=health, log=log, within=30, cwd=workdir, announces=running
    ) as answered:
        yield answered.removesuffix("/moto-api/data.json")


@pytest.fixture
async def aws(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> AsyncIterator[AwsResources]:
    """Fresh queues (intake, work, their DLQs), bucket and CodeBuild project in moto."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    async with aiohttp.ClientSession() as http:
        for path in ("reset", "recorder/reset-recording", "recorder/start-recording"):
            async with http.post(f"{moto_endpoint}/moto-api/{path}") as reply:
                reply.raise_for_status()
    session = aioboto3.Session()
    async with (
        session.client("sqs", endpoint_url=moto_endpoint) as sqs,
        session.client("s3", endpoint_url=moto_endpoint) as s3,
        session.client("codebuild", endpoint_url=moto_endpoint) as codebuild,
    ):
        yield await create_resources(moto_endpoint, sqs, s3, codebuild)


@pytest.fixture
async def git_world(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[GitWorld]:
    """A real SSH git host on 127.0.0.1 with a client key and a pinned known_hosts.

    Parametrized indirectly with ``{"ssh_rsa_only": True}``, the host behaves like
    CodeCommit's: an RSA host key offered only as ``ssh-rsa``, an RSA client key, and only
    ``ssh-rsa`` signatures accepted.
    """
    rsa_only = bool(getattr(request, "param", {}).get("ssh_rsa_only", False))
    keys = tmp_path / "keys"
    keys.mkdir()
    key = keys / ("id_rsa" if rsa_only else "id_ed25519")
    key_type = ["-t", "rsa", "-b", "3072"] if rsa_only else ["-t", "ed25519"]
    await anyio.run_process(["ssh-keygen", "-q", *key_type, "-N", "", "-f", str(key)])
    world_home = tmp_path / "home"
    world_home.mkdir()
    changes: list[RefChange] = []

    async def record(change: RefChange) -> None:
        changes.append(change)

    host = GitHost(
        tmp_path / "githost",
        host_key=keys / "host_key",
        authorized_keys=[key.with_suffix(".pub")],
        on_change=record,
        ssh_rsa_only=rsa_only,
    )
    world = GitWorld(
        host=host,
        key=key,
        known_hosts=keys / "known_hosts",
        home=world_home,
        changes=changes,
        legacy_rsa=rsa_only,
    )
    async with host:
        host.write_known_hosts(world.known_hosts)
        yield world


@pytest.fixture(scope="session")
def calls_dir() -> Path:
    """The run's list of service logs whose AWS calls the IAM proof evaluates."""
    return calls_directory()


@pytest.fixture
async def start_service(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, calls_dir: Path
) -> AsyncIterator[StartService]:
    started: list[ServiceProcess] = []
    cache = tmp_path / "cache"

    async def start(**overrides: str) -> ServiceProcess:
        env = service_env(
            git_world,
            cache,
            intake_url=aws.intake_url,
            work_url=aws.work_url,
            bucket=aws.bucket,
            **{
                "BRANCHBUILD_WAIT_TIME": "2",
                "BRANCHBUILD_INTAKE_VISIBILITY_TIMEOUT": "3",
                "BRANCHBUILD_VISIBILITY_TIMEOUT": "6",
                "BRANCHBUILD_RETRY_BASE_DELAY": "1",
                "BRANCHBUILD_RETRY_MAX_DELAY": "2",
                "BRANCHBUILD_LOG_LEVEL": "DEBUG",
            }
            | overrides,
        )
        service = ServiceProcess(env, tmp_path / f"service-{len(started)}.log")
        started.append(service)
        record_calls_of(calls_dir, service.log)
        await service.start()
        return service

    yield start
    for service in started:
        await service.stop()
