"""``make demo``: pushes whose outcomes are known, checked against what branchbuild did."""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import anyio.abc
from prometheus_client.parser import text_string_to_metric_families

from .codecommit import create_pull_request, describe, view_pull_request

if TYPE_CHECKING:
    pass

from .options import Keys, Options

log = logging.getLogger("branchbuild.localdev")


# -- demo -------------------------------------------------------------------------------------

PASSING = """version: 0.2
phases:
  build:
    commands:
      - echo building $BRANCH_NAME at $COMMIT_ID
      - test -f app.txt
"""
FAILING = """version: 0.2
phases:
  build:
    commands:
      - echo this build fails
      - exit 3
"""
# As long as seconds.txt says: the first push's build is still running when the second's starts.
SLOW = """version: 0.2
phases:
  build:
    commands:
      - echo building $BRANCH_NAME at $COMMIT_ID for $(cat seconds.txt) s
      - sleep $(cat seconds.txt)
"""


async def demo(options: Options, keys: Keys, codecommit: str, badges: str = "") -> bool:
    """Push four things, then a pull request's branch twice, wait for their outcomes, print a
    table, the branches' status badges (served from ``badges``) and what branchbuild left on
    the pull request; True if all are as expected."""
    from localdev.build_records import list_builds

    work = options.state / "demo-work" / uuid.uuid4().hex[:8]
    work.mkdir(parents=True)
    repo = options.repositories[0]
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(work),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_SSH_COMMAND": keys.git_ssh_command(),
        "GIT_AUTHOR_NAME": "demo",
        "GIT_AUTHOR_EMAIL": "demo@example.com",
        "GIT_COMMITTER_NAME": "demo",
        "GIT_COMMITTER_EMAIL": "demo@example.com",
    }

    async def git(*args: str) -> str:
        result = await anyio.run_process(["git", *args], cwd=work, env=env)
        return result.stdout.decode().strip()

    stamp = str(time.time_ns())
    baseline = await _metrics(options.http_port)
    await git("init", "--quiet", "--initial-branch=feature/demo-pass")
    await git("remote", "add", "origin", f"ssh://git@127.0.0.1:{options.git_port}/v1/repos/{repo}")
    (work / "app.txt").write_text(stamp)
    (work / "buildspec.yml").write_text(PASSING)
    await git("add", "--all")
    await git("commit", "--quiet", "-m", "a passing build")
    passing = await git("rev-parse", "HEAD")
    await git("push", "--quiet", "--force", "origin", "HEAD:feature/demo-pass")
    (work / "buildspec.yml").write_text(FAILING)
    await git("commit", "--quiet", "-am", "a failing build")
    failing = await git("rev-parse", "HEAD")
    await git("push", "--quiet", "--force", "origin", "HEAD:feature/demo-fail")
    await git("push", "--quiet", "--force", "origin", "HEAD:develop")

    def status(commit: str) -> str | None:
        for record in list_builds(options.state / "builds", limit=1000):
            if record.commit == commit and record.status != "IN_PROGRESS":
                return record.status
        return None

    with anyio.move_on_after(120):
        while True:
            if status(passing) is not None and status(failing) is not None:
                break
            await anyio.sleep(0.5)
    from localdev.notifications import demo_notifications  # issue 25

    notify_rows, notify_ok, notify_text = await demo_notifications(options, git, work, status)
    await git("push", "--quiet", "origin", "--delete", "feature/demo-fail")
    with anyio.move_on_after(60):
        while True:
            now = await _metrics(options.http_port)
            if _delta(now, baseline, "deleted") >= 1 and _delta(now, baseline, "protected") >= 1:
                break
            await anyio.sleep(0.5)
    after = await _metrics(options.http_port)
    pr_rows, pr_ok, pr_text = await _demo_pull_request(options, codecommit, git, passing, work)
    merge_rows, merge_ok, merge_text = await _demo_merge_build(options, codecommit, env, work)

    badge_rows, badge_ok, badge_text = await _demo_badges(badges, repo)
    pr_rows, pr_ok, pr_text = pr_rows + badge_rows, pr_ok + badge_ok, badge_text + pr_text
    rows = [
        ("push feature/demo-pass", "build SUCCEEDED", f"build {status(passing) or 'none'}"),
        ("push feature/demo-fail", "build FAILED", f"build {status(failing) or 'none'}"),
        (
            "push develop (protected)",
            "skipped: protected",
            f"protected events: +{_delta(after, baseline, 'protected'):g}",
        ),
        (
            "delete feature/demo-fail",
            "skipped: deleted",
            f"deleted events: +{_delta(after, baseline, 'deleted'):g}",
        ),
        *pr_rows,
        *merge_rows,
        *notify_rows,
    ]
    ok = [
        status(passing) == "SUCCEEDED",
        status(failing) == "FAILED",
        _delta(after, baseline, "protected") == 1,
        _delta(after, baseline, "deleted") == 1,
        *pr_ok,
        *merge_ok,
        *notify_ok,
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'what':<{width}}  {'expected':<26}  {'got':<28}  ok"]
    for (what, expected, got), good in zip(rows, ok, strict=True):
        lines.append(f"{what:<{width}}  {expected:<26}  {got:<28}  {'yes' if good else 'NO'}")
    sys.stdout.write(
        "\n" + "\n".join(lines) + "\n\n" + pr_text + "\n" + merge_text + "\n\n" + notify_text + "\n"
    )
    return all(ok)


async def _demo_pull_request(
    options: Options,
    codecommit: str,
    git: Callable[..., Awaitable[str]],
    base: str,
    work: Path,
) -> tuple[list[tuple[str, str, str]], list[bool], str]:
    """A pull request from feature/demo-pr into develop, its branch pushed twice while the
    first build still runs: that build is stopped (superseded), the second succeeds, and
    branchbuild leaves one comment per commit and its approval."""
    from localdev.build_records import list_builds

    def build(commit: str) -> Any:
        found = [r for r in list_builds(options.state / "builds", 1000) if r.commit == commit]
        return found[0] if found else None

    await git("checkout", "--quiet", "-b", "feature/demo-pr", base)
    (work / "buildspec.yml").write_text(SLOW)
    (work / "seconds.txt").write_text("120\n")
    await git("add", "--all")
    await git("commit", "--quiet", "-m", "a slow build")
    first = await git("rev-parse", "HEAD")
    await git("push", "--quiet", "--force", "origin", "HEAD:feature/demo-pr")
    number = await create_pull_request(
        codecommit,
        options.region,
        repository=options.repositories[0],
        source="feature/demo-pr",
        destination="develop",
        title="demo: a change built twice",
    )

    async def view() -> Any:
        return await view_pull_request(codecommit, options.region, number)

    # Push again once the first build runs its commands and its comment is on the PR.
    with anyio.move_on_after(120):
        while True:
            record = build(first)
            running = record is not None and any(
                p.name == "BUILD" and p.status == "IN_PROGRESS" for p in record.phases
            )
            if running and any(c[0] == first for c in (await view()).comments):
                break
            await anyio.sleep(0.5)
    (work / "seconds.txt").write_text("2\n")
    await git("commit", "--quiet", "-am", "a quick build")
    second = await git("rev-parse", "HEAD")
    await git("push", "--quiet", "origin", "HEAD:feature/demo-pr")

    def comment(pr: Any, commit: str) -> str:
        return next((c[2] for c in pr.comments if c[0] == commit), "")

    with anyio.move_on_after(120):
        while True:
            pr = await view()
            if (
                "superseded" in comment(pr, first)
                and "succeeded" in comment(pr, second)
                and pr.approvals
            ):
                break
            await anyio.sleep(0.5)
    pr = await view()
    one, two = build(first), build(second)
    approvals = ", ".join(state for _, state in pr.approvals) or "none"
    per_commit = {c[0] for c in pr.comments}
    rows = [
        (
            f"PR {number}: push 1",
            "build STOPPED, superseded",
            f"build {one.status if one else 'none'}"
            + (", superseded" if "superseded" in comment(pr, first) else ""),
        ),
        ("PR: push 2", "build SUCCEEDED", f"build {two.status if two else 'none'}"),
        ("PR: comments", "one per commit (2)", f"{len(pr.comments)} on {len(per_commit)} commits"),
        ("PR: approval", "APPROVE", approvals),
    ]
    ok = [
        one is not None and one.status == "STOPPED" and "superseded" in comment(pr, first),
        two is not None and two.status == "SUCCEEDED",
        len(pr.comments) == 2 and per_commit == {first, second},
        [state for _, state in pr.approvals] == ["APPROVE"],
    ]
    return rows, ok, "What branchbuild left on the pull request:\n\n" + describe(pr)


MERGED = """version: 0.2
phases:
  build:
    commands:
      - echo building $BRANCH_NAME at $COMMIT_ID
      - cat main.txt feature.txt
"""


async def _demo_merge_build(
    options: Options, codecommit: str, env: dict[str, str], work: Path
) -> tuple[list[tuple[str, str, str]], list[bool], str]:
    """Issue 25: a pull request in a repository whose rule builds pull requests as merged
    (localdev.components.PIPELINES): its merge is built, and built again when the destination
    (main, protected: not built itself) moves; the older merge build is superseded or done."""
    from localdev.build_records import list_builds

    from .components import MERGE_REPOSITORY

    if MERGE_REPOSITORY not in options.repositories:
        return [], [], ""
    here = work / "merge"
    here.mkdir()

    async def git(*args: str) -> str:
        result = await anyio.run_process(["git", *args], cwd=here, env=env)
        return result.stdout.decode().strip()

    url = f"ssh://git@127.0.0.1:{options.git_port}/v1/repos/{MERGE_REPOSITORY}"
    await git("init", "--quiet", "--initial-branch=main")
    (here / "buildspec.yml").write_text(MERGED)
    (here / "main.txt").write_text("main, first\n")
    await git("add", "--all")
    await git("commit", "--quiet", "-m", "main")
    await git("push", "--quiet", "--force", url, "HEAD:main")
    await git("checkout", "--quiet", "-b", "feature/demo-merge")
    (here / "feature.txt").write_text("a feature\n")
    await git("add", "--all")
    await git("commit", "--quiet", "-m", "a feature")
    await git("push", "--quiet", "--force", url, "HEAD:feature/demo-merge")
    number = await create_pull_request(
        codecommit,
        options.region,
        repository=MERGE_REPOSITORY,
        source="feature/demo-merge",
        destination="main",
        title="demo: built as merged",
    )
    branch = f"pr/{number}/.merge"

    def merges() -> list[Any]:
        found = [r for r in list_builds(options.state / "builds", 1000) if r.branch == branch]
        return sorted(found, key=lambda r: r.started_at)

    async def settled(count: int) -> None:
        with anyio.move_on_after(120):
            while True:
                found = merges()
                if len(found) >= count and all(r.status != "IN_PROGRESS" for r in found):
                    break
                await anyio.sleep(0.5)

    await settled(1)
    await git("checkout", "--quiet", "main")
    (here / "main.txt").write_text("main, moved on\n")
    await git("commit", "--quiet", "-am", "main moves")
    await git("push", "--quiet", url, "HEAD:main")
    await settled(2)

    async def merge_comments() -> list[str]:
        view = await view_pull_request(codecommit, options.region, number)
        return [c[2] for c in view.comments if "Merge build" in c[2]]

    with anyio.move_on_after(60):
        while True:
            if any("✅ Merge build succeeded" in c for c in await merge_comments()):
                break
            await anyio.sleep(0.5)
    builds = merges()
    first = builds[0].status if builds else "none"
    last = builds[-1] if len(builds) >= 2 else None
    comments = await merge_comments()
    rows = [
        (f"PR {number}: merge build", "merge built, SUCCEEDED", f"build {first}"),
        (
            "PR: destination moves",
            "merge rebuilt, SUCCEEDED",
            f"{len(builds)} merge builds, last {last.status if last else 'none'}",
        ),
        ("PR: merge comments", "one per merge build (2)", f"{len(comments)}"),
    ]
    ok = [
        first in ("SUCCEEDED", "STOPPED"),  # STOPPED: superseded by the second merge
        len(builds) == 2 and last is not None and last.status == "SUCCEEDED",
        len(comments) == 2 and any("✅ Merge build succeeded" in c for c in comments),
    ]
    view = await view_pull_request(codecommit, options.region, number)
    return rows, ok, "What branchbuild left on the merge-built pull request:\n\n" + describe(view)


async def _demo_badges(
    base: str, repository: str
) -> tuple[list[tuple[str, str, str]], list[bool], str]:
    """Each branch's status badge, fetched over HTTP as a README would show it."""
    from xml.etree import ElementTree

    from service.badges import escape_name

    expected = {"feature/demo-pass": "passing", "feature/demo-fail": "failing"}
    expected["feature/demo-pr"] = "passing"
    rows, ok, urls = [], [], []
    async with aiohttp.ClientSession() as http:
        for branch, word in expected.items():
            url = f"{base}/{escape_name(repository)}/branch/{escape_name(branch)}.svg"
            urls.append(f"  {branch}: {url}")
            got = "none"
            with anyio.move_on_after(60):
                while got != word:
                    async with http.get(url) as reply:
                        if reply.status == 200 and reply.content_type == "image/svg+xml":
                            root = ElementTree.fromstring(await reply.text())
                            texts = [e.text for e in root.iter() if e.get("id") == "message"]
                            got = str(texts[0]) if texts else "unreadable"
                    if got != word:
                        await anyio.sleep(0.5)
            rows.append((f"badge {branch}", word, got))
            ok.append(got == word)
    return rows, ok, "Status badges (SVG, image/svg+xml):\n" + "\n".join(urls) + "\n\n"


async def _metrics(port: int) -> dict[str, float]:
    """The service's ``branchbuild_events_total``, summed by outcome."""
    outcomes: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as reply:
            text = await reply.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "branchbuild_events_total":
                outcome = sample.labels["outcome"]
                outcomes[outcome] = outcomes.get(outcome, 0.0) + sample.value
    return outcomes


def _delta(after: dict[str, float], before: dict[str, float], outcome: str) -> float:
    return after.get(outcome, 0.0) - before.get(outcome, 0.0)
