"""Status badges (service/badges.py): the image, its keys, the compare-and-swap that keeps it
never older than the newest build, the image as a real headless Chromium shows it, and, end to
end, a build that CodeBuild retries (the CodeBuild stand-in's auto-retry) as the ledger, the
pull request comment and the badges follow it.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import aioboto3
import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from localdev.codebuild import CodeBuildStandIn
from localdev.codecommit import CodeCommitStandIn, git_resolver
from localdev.githost import codecommit_event
from service.badges import (
    COLOURS,
    LABEL_COLOUR,
    PREFIX,
    Badges,
    Status,
    branch_key,
    escape_name,
    pull_request_key,
    status_of,
    svg,
)
from service.build_state import Change
from service.builds import StartedBuild
from service.errors import AccessDenied
from service.ledger import Entry
from service.metrics import Metrics
from service.records import Records
from service.retries import RETRYING
from service.settings import load_settings
from tests.cfn import Stack
from tests.helpers import AwsResources, GitWorld, StartService, WorkCopy, push_for, wait_for
from tests.test_build_state import build_state_event, counted, ledger, send_build_event
from tests.test_iam import HTTPS, Request, simulate

if TYPE_CHECKING:
    from types_aiobotocore_codecommit import CodeCommitClient

SVG = "{http://www.w3.org/2000/svg}"
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


# -- the image and its keys ---------------------------------------------------------------------


def texts(image: str) -> dict[str, str]:
    root = ElementTree.fromstring(image)
    return {
        e.get("id") or "title": e.text or ""
        for e in root.iter()
        if e.tag.endswith(("text", "title"))
    }


@pytest.mark.parametrize("status", list(Status))
def test_each_status_says_its_word_in_its_colour(status: Status) -> None:
    image = svg(status)
    root = ElementTree.fromstring(image)
    assert texts(image) == {
        "title": f"build: {status.value}",
        "label": "build",
        "message": status.value,
    }
    box = root.find(f".//{SVG}rect[@id='message-box']")
    assert box is not None and box.get("fill") == COLOURS[status]
    # Self-contained: nothing fetched (no href, no url() but the gradient and the clip).
    assert (
        "href" not in image
        and "@import" not in image
        and "http" not in image.replace("http://www.w3.org/2000/svg", "")
    )


@pytest.mark.parametrize(
    "title", ["a<b>&c", '"><script>alert(1)</script>', "x' onload='y", "ü/ñ &amp; ]]>"]
)
def test_hostile_text_is_escaped(title: str) -> None:
    image = svg(Status.FAILING, title)
    root = ElementTree.fromstring(image)  # well-formed whatever the title
    assert texts(image)["title"] == f"build: failing ({title})"
    assert root.get("aria-label") == f"build: failing ({title})"
    assert not [e for e in root.iter() if "script" in e.tag]


@pytest.mark.parametrize(
    ("ledger_status", "shows"),
    [
        (None, Status.RUNNING),
        ("IN_PROGRESS", Status.RUNNING),
        (RETRYING, Status.RUNNING),
        ("SUCCEEDED", Status.PASSING),
        ("FAILED", Status.FAILING),
        ("FAULT", Status.FAILING),
        ("TIMED_OUT", Status.FAILING),
        ("STOPPED", Status.STOPPED),
    ],
)
def test_the_ledger_status_decides_the_badge(ledger_status: str | None, shows: Status) -> None:
    assert status_of(entry("p:1", T0, ledger_status)) is shows


branch_names = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=40
)


@given(branch_names, branch_names)
def test_escaped_names_are_one_url_safe_segment_and_never_shared(a: str, b: str) -> None:
    for name in (a, b):
        escaped = escape_name(name)
        assert re.fullmatch(r"[A-Za-z0-9._~-]+", escaped)
        assert quote(escaped, safe="") == escaped  # nothing a URL must encode
    assert (escape_name(a) == escape_name(b)) == (a == b)


def test_keys_of_branches_and_pull_requests_never_meet() -> None:
    assert branch_key("shop", "feature/login") == "badges~/shop/branch/feature~2Flogin.svg"
    assert pull_request_key("shop", "42") == "badges~/shop/pull-request/42.svg"
    # A branch named like the pull request folder stays one segment under branch/.
    assert branch_key("shop", "pull-request/42") == "badges~/shop/branch/pull-request~2F42.svg"
    assert branch_key("shop", "a~2Fb") != branch_key("shop", "a/b")
    assert PREFIX.startswith("badges~")  # no repository or branch name holds a '~'


# -- never older than the newest build (moto's S3, conditional writes) --------------------------


def entry(build_id: str, pushed: datetime, status: str | None, **more: Any) -> Entry:
    return Entry(
        commit="c" * 40,
        ref="refs/heads/feature/x",
        build_id=build_id,
        project="p",
        status=status,
        repository="shop",
        pushed_at=pushed.isoformat(),
        **more,
    )


def badges_for(aws: AwsResources, **settings: Any) -> Badges:
    s = load_settings(queue_url="q", work_queue_url="w", bucket=aws.bucket, badges=True, **settings)
    return Badges(Records(aws.s3, aws.bucket), s, Metrics())


async def shown(aws: AwsResources, key: str) -> tuple[str, dict[str, str]]:
    head = await aws.s3.head_object(Bucket=aws.bucket, Key=key)
    message = texts((await aws.object(key)).decode())["message"]
    return message, {"type": head["ContentType"], "cache": head.get("CacheControl", "")}


async def test_an_older_builds_late_outcome_never_replaces_a_newer_builds_badge(
    aws: AwsResources,
) -> None:
    badges = badges_for(aws)
    key = branch_key("shop", "feature/x")
    older, newer = entry("p:1", T0, None), entry("p:2", T0 + timedelta(seconds=5), None)

    assert await badges.publish_branch(older)
    assert await badges.publish_branch(newer)
    assert await shown(aws, key) == ("running", {"type": "image/svg+xml", "cache": "no-cache"})
    # The older build ends after the newer one started: its outcome is not shown.
    assert not await badges.publish_branch(replace(older, status="FAILED"))
    assert (await shown(aws, key))[0] == "running"
    assert await badges.publish_branch(replace(newer, status="SUCCEEDED"))
    assert (await shown(aws, key))[0] == "passing"
    # Redelivered and late events of the same build never take it back.
    assert not await badges.publish_branch(replace(newer, status="IN_PROGRESS"))
    assert not await badges.publish_branch(replace(newer, status="SUCCEEDED"))
    assert not await badges.publish_branch(replace(older, status="STOPPED"))
    assert (await shown(aws, key))[0] == "passing"
    # A newer push's build replaces it at its start.
    assert await badges.publish_branch(entry("p:3", T0 + timedelta(seconds=9), None))
    assert (await shown(aws, key))[0] == "running"


async def test_racing_writers_leave_the_newest_builds_badge(aws: AwsResources) -> None:
    """Instances racing with every state of three builds: whatever the order, the badge ends
    with the newest build's final state (every write is a compare-and-swap)."""
    badges = [badges_for(aws) for _ in range(3)]
    states = [
        entry(f"p:{n}", T0 + timedelta(seconds=n), status)
        for n in range(3)
        for status in (None, "IN_PROGRESS", "FAILED" if n == 2 else "SUCCEEDED")
    ]
    for round_ in range(3):
        order = states[round_:] + states[:round_]
        async with anyio.create_task_group() as group:
            for n, state in enumerate(reversed(order)):
                group.start_soon(badges[n % 3].publish_branch, state)
        assert (await shown(aws, branch_key("shop", "feature/x")))[0] == "failing"


async def test_entries_without_a_repository_or_of_tags_write_nothing(aws: AwsResources) -> None:
    badges = badges_for(aws)
    assert not await badges.publish_branch(replace(entry("p:1", T0, None), repository=None))
    assert not await badges.publish_branch(replace(entry("p:1", T0, None), ref="refs/tags/v1"))
    reply = await aws.s3.list_objects_v2(Bucket=aws.bucket, Prefix=PREFIX)
    assert reply.get("KeyCount", 0) == 0


# -- what a browser shows --------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Debian's headless Chromium (``make system-deps``), driven by its chromedriver."""
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=400,200")
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def png_pixels(data: bytes) -> list[list[tuple[int, int, int]]]:
    """RGB rows of an 8-bit RGB/RGBA, non-interlaced PNG (what Chromium's screenshots are)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0
    step = 4 if colour == 6 else 3
    raw, stride = zlib.decompress(idat), width * step
    rows: list[list[tuple[int, int, int]]] = []
    previous = bytearray(stride)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            left = line[i - step] if i >= step else 0
            up, corner = previous[i], previous[i - step] if i >= step else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (
                    line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)
                ) & 0xFF
        rows.append(
            [(line[x * step], line[x * step + 1], line[x * step + 2]) for x in range(width)]
        )
        previous = line
    return rows


def rgb(colour: str) -> tuple[int, int, int]:
    return (int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16))


def near(a: tuple[int, int, int], b: tuple[int, int, int], tolerance: int = 24) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


MEASURE = """
const out = {};
for (const id of ['label', 'message', 'label-box', 'message-box']) {
  const e = document.getElementById(id), b = e.getBBox();
  out[id] = {text: e.textContent, x: b.x, y: b.y, w: b.width, h: b.height,
             fill: getComputedStyle(e).fill};
}
out.title = document.querySelector('svg > title').textContent;
return out;
"""


@pytest.mark.timeout(180)
async def test_a_browser_shows_the_badge_served_from_s3(
    aws: AwsResources, browser: webdriver.Chrome
) -> None:
    """The badge as a README shows it: an <img> fetched over HTTP from the bucket (moto), whose
    pixels are read back; and inline, its texts measured inside their boxes."""
    badges = badges_for(aws)
    hostile = 'x/"><b>&amp;'
    ends = {Status.RUNNING: None, Status.PASSING: "SUCCEEDED", Status.FAILING: "FAILED"}
    ends |= {Status.STOPPED: "STOPPED"}
    for n, (status, ledger_status) in enumerate(ends.items()):
        built = replace(entry(f"p:{n}", T0, ledger_status), ref=f"refs/heads/{hostile}{n}")
        assert await badges.publish_branch(built)
        key = branch_key("shop", f"{hostile}{n}")
        # moto's bucket is private, as the artifact bucket is: a signed URL stands in for
        # the template's public route (CloudFront).
        src = await aws.s3.generate_presigned_url(
            "get_object", Params={"Bucket": aws.bucket, "Key": key}
        )
        page = (
            "<!doctype html><body style='margin:0;background:#fff'>"
            f"<img id='badge' src='{escape(src, {chr(39): '&#39;'})}'></body>"
        )
        # The page that embeds it (a README) is served from the same place.
        await aws.s3.put_object(
            Bucket=aws.bucket, Key=f"readme-{n}.html", Body=page.encode(), ContentType="text/html"
        )
        browser.get(
            await aws.s3.generate_presigned_url(
                "get_object", Params={"Bucket": aws.bucket, "Key": f"readme-{n}.html"}
            )
        )

        async def loaded() -> bool:
            return bool(
                browser.execute_script(
                    "const i = document.getElementById('badge');"
                    "return i.complete && i.naturalWidth > 0;"
                )
            )

        await wait_for(loaded, within=30, what=f"the {status} badge loaded as an image")
        image = (await aws.object(key)).decode()
        root = ElementTree.fromstring(image)
        label_width = int(root.find(f".//{SVG}rect[@id='label-box']").get("width"))  # type: ignore[union-attr,arg-type]
        width = int(root.get("width"))  # type: ignore[arg-type]
        assert (
            browser.execute_script("return document.getElementById('badge').naturalWidth") == width
        )
        pixels = png_pixels(browser.find_element(By.ID, "badge").screenshot_as_png)
        assert near(pixels[2][2 + 1], rgb(LABEL_COLOUR)), pixels[2][3]
        assert near(pixels[2][width - 4], rgb(COLOURS[status])), pixels[2][width - 4]
        message_row = pixels[10][label_width + 2 : width - 2]
        assert any(p == (255, 255, 255) or min(p) > 230 for p in message_row), "no text drawn"

        # Inline: the words, their colours, and each text inside its own box.
        browser.get(
            "data:text/html;charset=utf-8," + quote(f"<body style='margin:0'>{image}</body>")
        )
        seen = browser.execute_script(MEASURE)
        assert seen["title"] == f"build: {status.value} ({hostile}{n})"
        assert (seen["label"]["text"], seen["message"]["text"]) == ("build", status.value)
        assert seen["message-box"]["fill"] == "rgb({}, {}, {})".format(*rgb(COLOURS[status]))
        for text, box in (("label", "label-box"), ("message", "message-box")):
            t, b = seen[text], seen[box]
            assert b["x"] + 2 <= t["x"] and t["x"] + t["w"] <= b["x"] + b["w"] - 2, (text, t, b)
            assert 0 <= t["y"] and t["y"] + t["h"] <= 20


# -- end to end: a build CodeBuild retries ------------------------------------------------------

SERVICE = "arn:aws:iam::123456789012:user/testing"


@dataclass
class World:
    aws: AwsResources
    git: GitWorld
    codebuild: CodeBuildStandIn
    codecommit: CodeCommitStandIn
    developer: CodeCommitClient
    repo: WorkCopy

    async def push(self, branch: str, n: int) -> str:
        commit = await self.repo.commit({"n.txt": f"{n}\n"}, message=f"change {n}")
        await self.repo.push(f"HEAD:{branch}")
        change = self.git.changes[-1]
        await self.codecommit.pushed(change)
        await self.aws.send_event(codecommit_event(change))
        return commit

    async def badge(self, key: str) -> str | None:
        if key not in await self.aws.keys():
            return None
        return texts((await self.aws.object(key)).decode())["message"]

    async def badge_says(self, key: str, word: str) -> None:
        async def probe() -> bool:
            return await self.badge(key) == word

        await wait_for(probe, within=60, what=f"the badge {key} saying {word}")

    def comments(self, pull_request_id: str) -> list[str]:
        return [c.content for c in self.codecommit.comments_on(pull_request_id)]

    async def comment_saying(self, pull_request_id: str, text: str) -> str:
        async def probe() -> str | None:
            found = self.comments(pull_request_id)
            return found[-1] if len(found) == 1 and text in found[-1] else None

        return await wait_for(probe, within=60, what=f"a comment saying {text!r}")


@pytest.fixture
async def world(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[World]:
    async def forward(event: dict[str, Any]) -> None:  # the pipeline's rules, to the intake
        group = "codebuild" if event.get("source") == "aws.codebuild" else "pullrequest"
        await aws.sqs.send_message(
            QueueUrl=aws.intake_url,
            MessageBody=json.dumps(event),
            MessageGroupId=group,
            MessageDeduplicationId=uuid.uuid4().hex,
        )

    repo = await WorkCopy.create(git_world, tmp_path, "shop")
    await repo.commit({"README.md": "# shop\n"})
    await repo.push("main")
    session = aioboto3.Session(aws_access_key_id="developer", aws_secret_access_key="x")
    async with (
        CodeBuildStandIn(quota=5, on_event=forward) as codebuild,
        CodeCommitStandIn(resolve=git_resolver(git_world.host), on_event=forward) as codecommit,
    ):
        monkeypatch.setenv("AWS_ENDPOINT_URL_CODEBUILD", codebuild.endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL_CODECOMMIT", codecommit.endpoint)
        async with session.client("codecommit", endpoint_url=codecommit.endpoint) as developer:
            yield World(aws, git_world, codebuild, codecommit, developer, repo)


RETRIES = """
version: 1
rules:
  - repository: shop
    retries: 2
"""


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_a_build_that_passes_on_retry_2_is_one_success_everywhere(
    world: World, start_service: StartService, tmp_path: Path
) -> None:
    config = tmp_path / "pipelines.yaml"
    config.write_text(RETRIES)
    service = await start_service(
        BRANCHBUILD_CONFIG=str(config),
        BRANCHBUILD_BADGES="true",
        BRANCHBUILD_BADGES_URL="https://badges.example.com/",
        BRANCHBUILD_PULL_REQUEST_FEEDBACK="comment+approval",
    )
    await world.repo.checkout("feature/pay")
    await world.repo.commit({"pay.py": "pass\n"})
    await world.repo.push("feature/pay")
    reply = await world.developer.create_pull_request(
        title="Pay",
        targets=[
            {
                "repositoryName": "shop",
                "sourceReference": "feature/pay",
                "destinationReference": "main",
            }
        ],
    )
    pr = reply["pullRequest"]["pullRequestId"]
    commit = await world.push("feature/pay", 1)
    archive = f"shop/feature/pay/{commit}.zip"
    branch, pull = branch_key("shop", "feature/pay"), pull_request_key("shop", pr)

    started = await world.comment_saying(pr, "Build started")
    assert started.startswith(
        f"![build status](https://badges.example.com/shop/pull-request/{pr}.svg)\n"
    )
    await world.badge_says(branch, "running")
    await world.badge_says(pull, "running")
    [first] = world.codebuild.started_by()
    [(_, request)] = [r for r in world.codebuild.requests if r[0] == "StartBuild"]
    assert request["autoRetryLimitOverride"] == 2

    async def attempt(n: int) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            data = await ledger(world.aws, archive)
            return (
                data
                if data.get("attempt") == str(n) and data.get("status") == "IN_PROGRESS"
                else None
            )

        return await wait_for(probe, within=60, what=f"the ledger following retry {n}")

    # Two failed attempts: each is retried by CodeBuild, so neither is a failure anywhere.
    retry1 = await world.codebuild.finish(first.id, "FAILED")
    assert retry1 is not None
    data = await attempt(1)
    assert data["build_id"] == first.id and data["attempt_build_id"] == retry1.id
    await world.comment_saying(pr, "Build in progress (retry 1 of 2)")
    assert await world.badge(branch) == "running" and await world.badge(pull) == "running"
    retry2 = await world.codebuild.finish(retry1.id, "FAULT")
    assert retry2 is not None
    await attempt(2)
    done_retry = await world.codebuild.finish(retry2.id, "SUCCEEDED")
    assert done_retry is None  # a success is never retried

    done = await world.comment_saying(pr, "✅ Build passed on retry 2")
    assert f"retry 2 of 2 (build `{retry2.id}`)" in done
    await world.badge_says(branch, "passing")
    await world.badge_says(pull, "passing")
    data = await ledger(world.aws, archive)
    assert (data["status"], data["build_id"], data["attempt"]) == ("SUCCEEDED", first.id, "2")

    async def approved() -> bool:
        return world.codecommit.approvals(pr) == {SERVICE: "APPROVE"}

    await wait_for(approved, what="the service's approval")
    states = [c["approvalState"] for c in world.codecommit.calls("UpdatePullRequestApprovalState")]
    assert states == ["APPROVE"]  # never revoked for an attempt that was retried
    await counted(service, 2, "branchbuild_build_retries_total")
    assert await service.metric("branchbuild_build_results_total", status="succeeded") == 1
    assert await service.metric("branchbuild_build_results_total", status="failed") == 0
    assert await service.metric("branchbuild_build_results_total", status="fault") == 0

    # A late, redelivered end of the first attempt changes nothing.
    events = await service.metric("branchbuild_events_total", event="build_state")
    late = build_state_event(first.id, "FAILED", archive=archive, at=datetime.now(UTC))
    await send_build_event(world.aws, late)
    await counted(service, events + 1, "branchbuild_events_total", event="build_state")
    assert (await ledger(world.aws, archive))["status"] == "SUCCEEDED"
    assert await world.badge(branch) == "passing"
    assert world.comments(pr) == [done]


# -- the template's public route ----------------------------------------------------------------


def test_public_badges_are_cloudfronts_to_read_and_nothing_else_is_public() -> None:
    """deploy/badges.yaml and the pipeline's BadgeDistributionArn, resolved as the IAM proof
    resolves the templates and evaluated by its IAM policy evaluator: off by default; on, the
    bucket stays private (every public access block on), and only that distribution may read,
    only the badges; anyone else, and CloudFront itself elsewhere in the bucket, is denied."""
    repositories = "arn:aws:codecommit:eu-west-1:123456789012:app"
    plain = Stack("branchbuild-pipeline", "pipeline.yaml", {"RepositoryArns": repositories})
    [deny] = plain.properties("ArtifactBucketPolicy")["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny"

    badges = Stack("branchbuild-badges", "badges.yaml", imports=plain.exports())
    config = badges.properties("Distribution")["DistributionConfig"]
    [origin] = config["Origins"]
    bucket = plain.physical_name("ArtifactBucket")
    assert origin["DomainName"] == f"{bucket}.s3.eu-west-1.amazonaws.com"
    assert origin["OriginPath"] == "/" + PREFIX.rstrip("/")
    assert sorted(config["DefaultCacheBehavior"]["AllowedMethods"]) == ["GET", "HEAD"]
    assert config["DefaultCacheBehavior"]["ViewerProtocolPolicy"] == "redirect-to-https"

    distribution = "arn:aws:cloudfront::123456789012:distribution/E2BADGES0EXAMPLE"
    stack = Stack(
        "branchbuild-pipeline",
        "pipeline.yaml",
        {"RepositoryArns": repositories, "BadgeDistributionArn": distribution},
    )
    block = stack.properties("ArtifactBucket")["PublicAccessBlockConfiguration"]
    assert set(block.values()) == {True} and len(block) == 4
    policy = stack.properties("ArtifactBucketPolicy")["PolicyDocument"]
    badge = f"arn:aws:s3:::{bucket}/{branch_key('app', 'feature/x')}"
    archive = f"arn:aws:s3:::{bucket}/app/feature/x/{'a' * 40}.zip"
    cloudfront = {"aws:SourceArn": distribution} | HTTPS

    def read(principal: str, resource: str, context: dict[str, str]) -> Request:
        return Request("public", principal, "s3:GetObject", resource, [], policy, context)

    assert (
        simulate(
            [
                read("cloudfront.amazonaws.com", badge, cloudfront),
                read("cloudfront.amazonaws.com", archive, cloudfront),
                read("cloudfront.amazonaws.com", badge, cloudfront | {"aws:SourceArn": "x"}),
                read("arn:aws:iam::999999999999:root", badge, HTTPS),
                read("arn:aws:iam::999999999999:root", archive, HTTPS),
            ]
        )
        == ["Allowed"] + ["ImplicitlyDenied"] * 4
    )


async def test_a_badge_that_cannot_be_written_never_fails_the_build(aws: AwsResources) -> None:
    """A permission or a setting (here: no such bucket) is logged and counted; the job's hook
    and the event listener return, so the push and the event are not retried for it."""
    s = load_settings(queue_url="q", work_queue_url="w", bucket=aws.bucket, badges=True)
    metrics = Metrics()
    badges = Badges(Records(aws.s3, "branchbuild-no-such-bucket"), s, metrics)
    built = entry("p:1", T0, "SUCCEEDED")
    await badges.changed(Change(archive="shop/x.zip", before=None, after=built))
    await badges.started(push_for("shop", "feature/x"), StartedBuild("p:1", "p"), "shop/x.zip")
    assert metrics.errors.labels(kind="access_denied")._value.get() == 2
    with pytest.raises(AccessDenied):  # what the hooks catch, and only there
        await badges.publish_branch(built)
