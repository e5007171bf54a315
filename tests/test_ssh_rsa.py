"""CodeCommit's SSH as its users meet it: a host that offers only an ``ssh-rsa`` host key and
accepts only ``ssh-rsa`` signatures from RSA user keys, which OpenSSH 8.8 and later refuse by
default. The legacy algorithms are enabled for the configured hosts only, pinning kept."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from service.errors import GitAccessDenied, HostKeyMismatch
from service.git import Git
from tests.conftest import REGION
from tests.helpers import (
    AwsResources,
    GitWorld,
    StartService,
    WorkCopy,
    create_project,
    push_for,
    wait_for,
    zip_listing,
)
from tests.test_e2e import send_change
from tests.test_git import archive_bytes, make_settings

CODECOMMIT_LIKE = pytest.mark.parametrize("git_world", [{"ssh_rsa_only": True}], indirect=True)


async def pushed(world: GitWorld, tmp_path: Path) -> tuple[WorkCopy, str]:
    repo = await WorkCopy.create(world, tmp_path, "legacy")
    commit = await repo.commit({"README.md": "# legacy\n", "src/app.py": "print(1)\n"})
    await repo.push("main:feature/rsa")
    return repo, commit


def test_the_generated_ssh_config_enables_ssh_rsa_for_codecommit_hosts_only(
    tmp_path: Path,
) -> None:
    key = tmp_path / "key"
    key.write_text("not used\n")
    known = tmp_path / "known_hosts"
    known.write_text("git-codecommit.eu-west-1.amazonaws.com ssh-rsa AAAA\n")
    from service.settings import load_settings

    settings = load_settings(
        queue_url="q",
        work_queue_url="w",
        bucket="bucket",
        ssh_key_file=key,
        known_hosts_file=known,
        cache_dir=tmp_path / "cache",
    )
    Git(settings)
    config = (tmp_path / "cache" / "ssh" / "config").read_text()
    legacy, rest = config.split("Host *\n")
    assert legacy.splitlines()[0].startswith(
        "Host git-codecommit.*.amazonaws.com git-codecommit-fips.*.amazonaws.com"
    )
    # PubkeyAcceptedKeyTypes: read by every OpenSSH since 7.0; PubkeyAcceptedAlgorithms stops
    # any before 8.5 with "Bad configuration option".
    assert "HostKeyAlgorithms +ssh-rsa" in legacy and "PubkeyAcceptedKeyTypes +ssh-rsa" in legacy
    assert "PubkeyAcceptedAlgorithms" not in config
    assert "ssh-rsa" not in rest and "StrictHostKeyChecking yes" in rest

    # What OpenSSH itself makes of it: ssh-rsa for CodeCommit, not for any other host.
    def resolved(host: str) -> str:
        return subprocess.run(
            ["ssh", "-G", "-F", str(tmp_path / "cache" / "ssh" / "config"), host],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    other = resolved("git.example.com")
    for host in (
        "git-codecommit.eu-west-1.amazonaws.com",
        "git-codecommit-fips.us-east-1.amazonaws.com",
        "git-codecommit.cn-north-1.amazonaws.com.cn",
        "vpce-0a1b2c3d4e5f60718-abcdefgh.git-codecommit.eu-west-1.vpce.amazonaws.com",
        "vpce-0a1b2c3d4e5f60718-abcdefgh-eu-west-1a.git-codecommit.eu-west-1.vpce.amazonaws.com",
        "vpce-0a1b2c3d4e5f60718-abcdefgh.git-codecommit-fips.us-east-1.vpce.amazonaws.com",
        "vpce-0a1b2c3d4e5f60718-abcdefgh.git-codecommit.cn-north-1.vpce.amazonaws.com.cn",
    ):
        codecommit = resolved(host)
        for line in ("hostkeyalgorithms", "pubkeyacceptedalgorithms"):
            [value] = [entry for entry in codecommit.splitlines() if entry.startswith(line + " ")]
            assert "ssh-rsa" in value.split()[1].split(","), (host, value)
    for line in ("hostkeyalgorithms", "pubkeyacceptedalgorithms"):
        [value] = [entry for entry in other.splitlines() if entry.startswith(line + " ")]
        assert "ssh-rsa" not in value.split()[1].split(","), value


@CODECOMMIT_LIKE
async def test_a_host_offering_only_ssh_rsa_is_fetched_with_the_legacy_setting(
    git_world: GitWorld, tmp_path: Path
) -> None:
    assert git_world.host.known_hosts_line().split()[1] == "ssh-rsa"
    repo, commit = await pushed(git_world, tmp_path)
    git = Git(make_settings(git_world, tmp_path, ssh_legacy_rsa_hosts=("127.0.0.1",)))
    fetched = await git.fetch(push_for("legacy", "feature/rsa", commit))
    assert zip_listing(await archive_bytes(git, fetched)) == await repo.archive_listing(commit)
    assert await git.probe("legacy", REGION) == 1


@CODECOMMIT_LIKE
async def test_without_the_setting_the_refusal_names_the_setting(
    git_world: GitWorld, tmp_path: Path
) -> None:
    _, commit = await pushed(git_world, tmp_path)
    git = Git(make_settings(git_world, tmp_path))  # default: CodeCommit's hosts, not 127.0.0.1
    with pytest.raises(HostKeyMismatch, match="BRANCHBUILD_SSH_LEGACY_RSA_HOSTS") as caught:
        await git.fetch(push_for("legacy", "feature/rsa", commit))
    assert "their offer: ssh-rsa" in str(caught.value).lower()


@CODECOMMIT_LIKE
async def test_the_host_accepts_only_ssh_rsa_signatures(
    git_world: GitWorld, tmp_path: Path
) -> None:
    # The host key alone is not enough: an RSA key signing with rsa-sha2 is refused, as
    # CodeCommit refuses it, so the client must also allow ssh-rsa signatures.
    await pushed(git_world, tmp_path)
    url = git_world.url_template.format(repository="legacy")
    base = [
        "ssh",
        "-i",
        str(git_world.key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={git_world.known_hosts}",
        "-o",
        "HostKeyAlgorithms=+ssh-rsa",
    ]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1"}
    refused = await anyio.run_process(
        ["git", "ls-remote", url], env=env | {"GIT_SSH_COMMAND": " ".join(base)}, check=False
    )
    assert refused.returncode != 0 and b"permission denied" in refused.stderr.lower()
    legacy = " ".join([*base, "-o", "PubkeyAcceptedAlgorithms=+ssh-rsa"])
    allowed = await anyio.run_process(
        ["git", "ls-remote", url], env=env | {"GIT_SSH_COMMAND": legacy}, check=False
    )
    assert allowed.returncode == 0 and b"refs/heads/feature/rsa" in allowed.stdout


@CODECOMMIT_LIKE
async def test_pinning_still_holds_for_a_legacy_host(git_world: GitWorld, tmp_path: Path) -> None:
    _, commit = await pushed(git_world, tmp_path)
    other = tmp_path / "other_rsa"
    await anyio.run_process(["ssh-keygen", "-q", "-t", "rsa", "-N", "", "-f", str(other)])
    host = git_world.known_hosts.read_text().split()[0]
    wrong = tmp_path / "wrong_known_hosts"
    algorithm, data = other.with_suffix(".pub").read_text().split()[:2]
    wrong.write_text(f"{host} {algorithm} {data}\n")
    git = Git(
        make_settings(
            git_world, tmp_path, ssh_legacy_rsa_hosts=("127.0.0.1",), known_hosts_file=wrong
        )
    )
    with pytest.raises(HostKeyMismatch, match="does not match known_hosts"):
        await git.fetch(push_for("legacy", "feature/rsa", commit))


@CODECOMMIT_LIKE
async def test_an_ed25519_key_is_refused_by_the_legacy_host(
    git_world: GitWorld, tmp_path: Path
) -> None:
    _, commit = await pushed(git_world, tmp_path)
    other = tmp_path / "id_ed25519"
    await anyio.run_process(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)])
    git = Git(
        make_settings(git_world, tmp_path, ssh_legacy_rsa_hosts=("127.0.0.1",), ssh_key_file=other)
    )
    with pytest.raises(GitAccessDenied):
        await git.fetch(push_for("legacy", "feature/rsa", commit))


@pytest.mark.e2e
@CODECOMMIT_LIKE
async def test_a_push_through_a_codecommit_like_host_becomes_a_build(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "legacy")
    _, commit = await pushed(git_world, tmp_path)
    await start_service(BRANCHBUILD_SSH_LEGACY_RSA_HOSTS="127.0.0.1")
    await send_change(aws, git_world.changes[-1])

    async def started() -> list[dict[str, Any]] | None:
        found = await aws.start_builds()
        return found or None

    [request] = await wait_for(started, within=60, what="a StartBuild request")
    assert request["sourceLocationOverride"] == f"{aws.bucket}/legacy/feature/rsa/{commit}.zip"
