"""The local SSH git host, driven by the real OpenSSH client and the real git CLI."""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import asyncssh
import pytest

from localdev.githost import GitHost
from service.events import RefChange, codecommit_event


@dataclass
class Client:
    """A git user on this machine: an SSH key, a known_hosts file and an isolated git setup."""

    home: Path
    key: Path
    known_hosts: Path

    def ssh(self, key: Path | None = None) -> list[str]:
        """The OpenSSH command line: this key only, the host key pinned, no prompts."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(key or self.key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
        ]

    def env(self, key: Path | None = None) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(self.home),
            "LC_ALL": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_AUTHOR_NAME": "Dev",
            "GIT_AUTHOR_EMAIL": "dev@example.com",
            "GIT_COMMITTER_NAME": "Dev",
            "GIT_COMMITTER_EMAIL": "dev@example.com",
            "GIT_SSH_COMMAND": " ".join(self.ssh(key)),
        }

    async def git(
        self, *args: str, cwd: Path | None = None, check: bool = True, key: Path | None = None
    ) -> tuple[int, str, str]:
        """Run git without blocking the loop the host runs in; return (status, stdout, stderr)."""
        result = await anyio.run_process(
            ["git", *args], cwd=cwd or self.home, env=self.env(key), check=False
        )
        out, err = result.stdout.decode(), result.stderr.decode()
        if check and result.returncode != 0:
            raise AssertionError(f"git {' '.join(args)} failed: {err}")
        return result.returncode, out.strip(), err

    async def commit(self, work: Path, message: str) -> str:
        await self.git("commit", "--quiet", "--allow-empty", "-m", message, cwd=work)
        return (await self.git("rev-parse", "HEAD", cwd=work))[1]


async def keygen(path: Path) -> Path:
    await anyio.run_process(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)])
    return path


def url(host: GitHost, path: str = "/v1/repos/demo") -> str:
    return f"ssh://git@127.0.0.1:{host.port}{path}"


@pytest.fixture
async def client(tmp_path: Path) -> Client:
    home = tmp_path / "home"
    home.mkdir()
    return Client(home, await keygen(tmp_path / "id_ed25519"), tmp_path / "known_hosts")


@pytest.fixture
def changes() -> list[RefChange]:
    return []


@pytest.fixture
async def host(tmp_path: Path, client: Client, changes: list[RefChange]) -> AsyncIterator[GitHost]:
    async def record(change: RefChange) -> None:
        changes.append(change)

    githost = GitHost(
        tmp_path / "root",
        host_key=tmp_path / "host_key",
        authorized_keys=[client.key.with_suffix(".pub")],
        on_change=record,
    )
    githost.create_repository("demo")
    async with githost:
        githost.write_known_hosts(client.known_hosts)
        yield githost


@pytest.fixture
async def work(client: Client, host: GitHost, tmp_path: Path) -> Path:
    """A working copy whose origin is the demo repository."""
    work = tmp_path / "work"
    await client.git("init", "--quiet", "--initial-branch=main", str(work))
    await client.git("remote", "add", "origin", url(host), cwd=work)
    return work


def envelope(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "detail"}


SAMPLE_ID = "0d6f1c7a-3b41-4e0e-8a4e-6f2a9b6f8a01"
SAMPLE_ENVELOPE = {
    "version": "0",
    "detail-type": "CodeCommit Repository State Change",
    "source": "aws.codecommit",
    "account": "111122223333",
    "region": "eu-west-1",
    "resources": ["arn:aws:codecommit:eu-west-1:111122223333:payments-api"],
    "id": SAMPLE_ID,
    "time": "2026-11-20T09:14:03Z",
}
OLD, NEW = "9f2c61d0a4b7e83c5d19f0e2a6b4c8d7e1f3a5b9", "3a8b0c4e2f61d97a5b13c8e0f4d2a6b9c7e1f0d3"
FEATURE = "refs/heads/feature/PAY-1432-refunds"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (  # branch-created.json
            RefChange("payments-api", FEATURE, None, OLD),
            {"event": "referenceCreated", "referenceType": "branch", "commitId": OLD},
        ),
        (  # branch-updated.json
            RefChange("payments-api", FEATURE, OLD, NEW),
            {
                "event": "referenceUpdated",
                "referenceType": "branch",
                "commitId": NEW,
                "oldCommitId": OLD,
            },
        ),
        (  # branch-deleted.json
            RefChange("payments-api", FEATURE, NEW, None),
            {"event": "referenceDeleted", "referenceType": "branch", "oldCommitId": NEW},
        ),
        (  # tag-created.json
            RefChange("payments-api", "refs/tags/v2.14.0", None, NEW),
            {
                "event": "referenceCreated",
                "referenceType": "tag",
                "referenceName": "v2.14.0",
                "referenceFullName": "refs/tags/v2.14.0",
                "commitId": NEW,
            },
        ),
    ],
)
def test_codecommit_event_has_the_shape_of_the_samples(
    change: RefChange, expected: dict[str, Any]
) -> None:
    # The samples are tests/events/*.json; ids and the caller are invented there.
    event = codecommit_event(
        change,
        account="111122223333",
        event_id=SAMPLE_ID,
        time=datetime(2026, 11, 20, 9, 14, 3, tzinfo=UTC),
    )
    assert envelope(event) == SAMPLE_ENVELOPE
    detail = event["detail"]
    assert detail == {
        "callerUserArn": "arn:aws:iam::111122223333:user/localdev",
        "repositoryId": detail["repositoryId"],
        "repositoryName": "payments-api",
        "referenceName": "feature/PAY-1432-refunds",
        "referenceFullName": FEATURE,
        **expected,
    }
    again = codecommit_event(change, account="111122223333")
    assert again["detail"]["repositoryId"] == detail["repositoryId"]  # stable per repository
    assert again["id"] != event["id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", again["time"])


def test_codecommit_event_rejects_refs_that_are_not_branches_or_tags() -> None:
    with pytest.raises(ValueError, match="no event"):
        codecommit_event(RefChange("demo", "refs/notes/commits", None, NEW))


async def test_push_reports_created_updated_and_deleted_refs(
    client: Client, host: GitHost, work: Path, changes: list[RefChange]
) -> None:
    first = await client.commit(work, "first")
    await client.git("branch", "feature/x", cwd=work)
    await client.git("tag", "-a", "-m", "release", "v1", cwd=work)
    await client.git("push", "--quiet", "origin", "main", "feature/x", "v1", cwd=work)
    # on_change runs before the push's exit status is sent, so no waiting is needed.
    assert changes == [
        RefChange("demo", "refs/heads/feature/x", None, first),
        RefChange("demo", "refs/heads/main", None, first),
        RefChange("demo", "refs/tags/v1", None, first),  # the annotated tag, peeled
    ]

    changes.clear()
    await client.git("checkout", "--quiet", "feature/x", cwd=work)
    second = await client.commit(work, "second")
    await client.git("push", "--quiet", "origin", "feature/x", cwd=work)
    assert changes == [RefChange("demo", "refs/heads/feature/x", first, second)]

    changes.clear()
    await client.git("push", "--quiet", "origin", "--delete", "feature/x", cwd=work)
    assert changes == [RefChange("demo", "refs/heads/feature/x", second, None)]

    updated = codecommit_event(RefChange("demo", "refs/heads/feature/x", first, second))["detail"]
    assert (updated["event"], updated["commitId"], updated["oldCommitId"]) == (
        "referenceUpdated",
        second,
        first,
    )
    deleted = codecommit_event(changes[0])["detail"]
    assert deleted["event"] == "referenceDeleted" and "commitId" not in deleted
    assert deleted["referenceName"] == "feature/x" and deleted["oldCommitId"] == second
    tag = codecommit_event(RefChange("demo", "refs/tags/v1", None, first))["detail"]
    assert (tag["event"], tag["referenceType"], tag["referenceName"]) == (
        "referenceCreated",
        "tag",
        "v1",
    )
    assert "oldCommitId" not in tag and tag["repositoryName"] == "demo"


async def test_concurrent_pushes_are_each_reported_once(
    client: Client, host: GitHost, work: Path, changes: list[RefChange]
) -> None:
    base = await client.commit(work, "base")
    tips = {}
    for n in range(4):
        await client.git("checkout", "--quiet", "-b", f"b{n}", base, cwd=work)
        tips[f"refs/heads/b{n}"] = await client.commit(work, f"on b{n}")
    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(partial(client.git, "push", "--quiet", "origin", f"b{n}", cwd=work))
    assert sorted(changes, key=lambda c: c.ref) == [
        RefChange("demo", ref, None, tip) for ref, tip in sorted(tips.items())
    ]


async def test_failing_on_change_is_logged_and_the_push_succeeds(
    client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def explode(change: RefChange) -> None:
        raise RuntimeError("event bus down")

    githost = GitHost(
        tmp_path / "root",
        host_key=tmp_path / "host_key",
        authorized_keys=[client.key.with_suffix(".pub")],
        on_change=explode,
    )
    githost.create_repository("demo")
    work = tmp_path / "work"
    await client.git("init", "--quiet", "--initial-branch=main", str(work))
    sha = await client.commit(work, "one")
    async with githost:
        githost.write_known_hosts(client.known_hosts)
        with caplog.at_level(logging.ERROR, logger="branchbuild.githost"):
            await client.git("push", "--quiet", url(githost), "main", cwd=work)
        _, remote, _ = await client.git("ls-remote", url(githost), "refs/heads/main")
    assert remote.split() == [sha, "refs/heads/main"]
    assert "on_change failed" in caplog.text and "event bus down" in caplog.text


async def test_clone_and_fetch_of_an_old_commit_with_protocol_v2(
    client: Client, host: GitHost, work: Path, tmp_path: Path
) -> None:
    commits = [await client.commit(work, f"commit {n}") for n in range(16)]
    await client.git("push", "--quiet", "origin", "main", cwd=work)

    clone = tmp_path / "clone"
    await client.git("clone", "--quiet", url(host), str(clone))
    assert (await client.git("rev-parse", "HEAD", cwd=clone))[1] == commits[-1]
    log = (await client.git("log", "--format=%H", cwd=clone))[1].split()
    assert log == commits[::-1]

    old = commits[0]  # 15 commits behind the tip, and not advertised by any ref
    empty = tmp_path / "empty.git"
    await client.git("init", "--quiet", "--bare", str(empty))
    # Protocol v0 only serves advertised refs: this fails unless GIT_PROTOCOL got through.
    status, _, err = await client.git(
        "-c", "protocol.version=0", "fetch", "--quiet", url(host), old, cwd=empty, check=False
    )
    assert status != 0 and "unadvertised object" in err
    count = host.upload_pack_count
    await client.git("-c", "protocol.version=2", "fetch", "--quiet", url(host), old, cwd=empty)
    assert host.upload_pack_count == count + 1
    assert (await client.git("cat-file", "-t", old, cwd=empty))[1] == "commit"
    assert (await client.git("rev-parse", "FETCH_HEAD", cwd=empty))[1] == old


async def test_protocol_v0_host_serves_only_advertised_commits_by_id(
    client: Client, host: GitHost, work: Path, tmp_path: Path
) -> None:
    old = await client.commit(work, "old")
    tip = await client.commit(work, "tip")
    await client.git("push", "--quiet", "origin", "main", cwd=work)
    host.protocol_v0 = True
    empty = tmp_path / "v0.git"
    await client.git("init", "--quiet", "--bare", str(empty))
    fetch = ("-c", "protocol.version=2", "fetch", "--quiet", "--depth=1", url(host))
    status, _, err = await client.git(*fetch, old, cwd=empty, check=False)
    assert status != 0 and "unadvertised object" in err
    await client.git(*fetch, tip, cwd=empty)  # the tip of main is advertised
    assert (await client.git("cat-file", "-t", tip, cwd=empty))[1] == "commit"


async def test_wrong_host_key_fails_verification(
    client: Client, host: GitHost, tmp_path: Path
) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()
    client.known_hosts.write_text(f"[127.0.0.1]:{host.port} {other[0]} {other[1]}\n")
    status, _, err = await client.git("ls-remote", url(host), check=False)
    assert status != 0 and "Host key verification failed" in err
    assert host.upload_pack_count == 0


async def test_unknown_and_refused_client_keys_cannot_log_in(
    client: Client, host: GitHost, tmp_path: Path
) -> None:
    stranger = await keygen(tmp_path / "stranger")
    status, _, err = await client.git("ls-remote", url(host), key=stranger, check=False)
    assert status != 0 and "Permission denied (publickey)" in err

    host.refuse_all_keys = True
    status, _, err = await client.git("ls-remote", url(host), check=False)
    assert status != 0 and "Permission denied (publickey)" in err

    host.refuse_all_keys = False
    assert (await client.git("ls-remote", url(host)))[0] == 0
    assert host.upload_pack_count == 1


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/v1/repos/../outside", "invalid repository path"),
        ("/v1/outside", "invalid repository path"),
        ("/etc/passwd", "invalid repository path"),
        ("/v1/repos/demo/../../outside", "invalid repository path"),
        ("/v1/repos/missing", "repository 'missing' does not exist"),
    ],
)
async def test_bad_paths_are_refused(
    client: Client, host: GitHost, work: Path, path: str, message: str
) -> None:
    # A real repository just outside the served tree: a path bug would let a push land there.
    outside = host.root / "v1" / "outside.git"
    await client.git("init", "--quiet", "--bare", str(outside))
    await client.commit(work, "one")
    for args in (["ls-remote", url(host, path)], ["push", url(host, path), "main"]):
        status, _, err = await client.git(*args, cwd=work, check=False)
        assert status != 0 and message in err
    assert (await client.git("for-each-ref", cwd=outside))[1] == ""
    assert sorted(p.name for p in (host.root / "v1" / "repos").iterdir()) == ["demo.git"]
    assert host.upload_pack_count == 0


async def ssh(client: Client, host: GitHost, *command: str) -> tuple[int, bytes, str]:
    result = await anyio.run_process(
        [*client.ssh(), "-p", str(host.port), "git@127.0.0.1", *command],
        input=b"0000",  # a flush-pkt: "no wants / no commands", so git exits cleanly
        check=False,
    )
    return result.returncode, result.stdout, result.stderr.decode()


async def test_only_git_commands_are_served(client: Client, host: GitHost, work: Path) -> None:
    await client.commit(work, "one")
    await client.git("push", "--quiet", "origin", "main", cwd=work)
    status, _, err = await ssh(client, host, "cat /etc/passwd")
    assert status == 128 and "only git-upload-pack and git-receive-pack" in err
    status, _, err = await ssh(client, host)  # a shell request
    assert status == 128 and "no shell here" in err
    status, _, err = await ssh(client, host, "git-upload-pack '/v1/repos/demo'; touch /tmp/x")
    assert status == 128 and "only git-upload-pack" in err
    for command in ("git upload-pack /v1/repos/demo", "git-receive-pack /v1/repos/demo"):
        status, out, _ = await ssh(client, host, command)  # the unquoted forms
        assert status == 0 and b" refs/heads/main" in out and out.endswith(b"0000")


async def test_upload_pack_delay_slows_a_fetch(client: Client, host: GitHost) -> None:
    host.upload_pack_delay = 0.5
    started = time.monotonic()
    await client.git("ls-remote", url(host))
    assert time.monotonic() - started >= 0.5
    assert host.upload_pack_count == 1


async def test_drop_after_bytes_breaks_a_clone(
    client: Client, host: GitHost, work: Path, tmp_path: Path
) -> None:
    (work / "blob").write_bytes(os.urandom(256 * 1024))  # incompressible: a large pack
    await client.git("add", "blob", cwd=work)
    sha = await client.commit(work, "big")
    await client.git("push", "--quiet", "origin", "main", cwd=work)

    host.drop_after_bytes = 4096
    status, _, err = await client.git("clone", url(host), str(tmp_path / "broken"), check=False)
    assert status != 0 and "fatal" in err
    host.drop_after_bytes = None
    await client.git("clone", "--quiet", url(host), str(tmp_path / "whole"))
    assert (await client.git("rev-parse", "HEAD", cwd=tmp_path / "whole"))[1] == sha
    assert host.upload_pack_count == 2


def git_processes(repository: Path) -> Sequence[int]:
    """Pids of the git processes that serve ``repository``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline[:1] == [b"git"] and str(repository).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


async def test_aclose_kills_git_and_closes_connections(client: Client, tmp_path: Path) -> None:
    githost = GitHost(
        tmp_path / "root",
        host_key=tmp_path / "host_key",
        authorized_keys=[client.key.with_suffix(".pub")],
    )
    repository = githost.create_repository("demo")
    await githost.start()
    githost.write_known_hosts(client.known_hosts)
    # receive-pack waits for the client's commands after advertising refs; stdin stays open.
    async with await anyio.open_process(
        [
            *client.ssh(),
            "-p",
            str(githost.port),
            "git@127.0.0.1",
            "git-receive-pack '/v1/repos/demo'",
        ],
    ) as session:
        assert session.stdout is not None
        with anyio.fail_after(10):
            assert (await session.stdout.receive()).startswith(b"00")
        assert git_processes(repository)
        await githost.aclose()
        assert git_processes(repository) == []
        with anyio.fail_after(10):
            assert await session.wait() != 0


async def test_host_key_is_created_once_and_reused(client: Client, tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "host_key"
    lines = []
    for _ in range(2):
        githost = GitHost(tmp_path / "root", host_key=key_file, authorized_keys=[])
        async with githost:
            lines.append(githost.known_hosts_line())
            assert lines[-1].startswith(f"[127.0.0.1]:{githost.port} ssh-ed25519 AAAA")
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert lines[0].split()[1:] == lines[1].split()[1:]
    fingerprint = await anyio.run_process(["ssh-keygen", "-l", "-f", str(key_file)])
    public = asyncssh.import_public_key(" ".join(lines[1].split()[1:]))
    assert public.get_fingerprint() in fingerprint.stdout.decode()
