"""The ledger and per-branch keys (service.ledger), against moto over HTTP.

The property: under every key template the service accepts, whatever the branch names, no
operation on one branch (its uploads, its ledger entries, its badge, its waiting push, its
current build, its notification, feedback and merge documents, aborting its stale uploads,
dropping its waiting push and its clean-up on deletion) ever touches an object of another
branch; and two rules' templates the configuration accepts never name one object.
"""

from __future__ import annotations

import json
import uuid
from contextlib import AsyncExitStack
from dataclasses import replace

import anyio
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.aws import AccountClients, open_clients
from service.badges import Badges
from service.badges import branch_key as badges_branch_key
from service.cleanup import clean_up_branch
from service.errors import ConfigurationError, MalformedEvent
from service.events import Action, RefType, check_ref_name, merge_branch
from service.ledger import Entry, Ledger, archive_key, branch_keys
from service.mergebuilds import MERGE_SUFFIX
from service.metrics import Metrics
from service.notify import branch_key as notify_branch_key
from service.notify import build_key as notify_build_key
from service.pipelines import OnDelete, Pipelines, parse_config
from service.pullrequests import FEEDBACK_SUFFIX, PullRequests
from service.queue import Queue
from service.records import Records
from service.scheduler import Scheduler, waiting_key
from service.settings import MiB, check_key_template, load_settings
from service.storage import Storage
from service.supersede import current_key
from tests.helpers import AwsResources, push_for
from tests.test_worker import settings_for

# -- which templates are accepted -------------------------------------------------------------

REFUSED = {
    "{repository}/{commit}.zip": "must contain {branch} or {ref}",
    "{commit}.zip": "must contain {branch} or {ref}",
    "{repository}/{branch}-{commit}.zip": "{branch} must be a whole path segment",
    "{repository}/{branch}/{repository}-{commit}.zip": "may not hold {repository}",
    "{repository}-{branch}/{commit}.zip": "{branch} must be a whole path segment",
    "{repository}/x{ref}/{commit}.zip": "{ref} must be a whole path segment",
    "{repository}/{commit}/{branch}": "{branch} must be a whole path segment",
    "{repository}/{branch}/{commit}/{repository}.zip": "may not hold {repository}",
    "{branch}/{commit}.zip": "must contain {repository}",
    # A format spec or conversion: {commit:.7} gives two commits one key (and the branch's
    # pattern, made from a marker the spec cut, matched none of its keys).
    "{repository}/{branch}/{commit:.7}.zip": "{commit} may have no format spec",
    "{repository}/{branch!s}/{commit}.zip": "{branch} may have no format spec",
    "{repository:.3}/{branch}/{commit}.zip": "{repository} may have no format spec",
    # Its archives read as ledger entries: a tag's archive went with a branch of its name.
    "{repository}/{branch}/{commit}.build.json": "may not end in '.json'",
    "{repository}/{ref}/{commit}.json": "may not end in '.json'",
}
ACCEPTED = (
    "{repository}/{branch}/{commit}.zip",
    "{repository}/{ref}/{commit}.zip",
    "builds/{commit}/{repository}/{branch}/a.zip",
    "ci/x-{repository}/{ref}/{branch}/c-{commit}",
)


@pytest.mark.parametrize(("template", "reason"), sorted(REFUSED.items()))
def test_key_templates_under_which_branches_share_keys_are_refused(
    template: str, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason.replace("{", r"\{").replace("}", r"\}")):
        check_key_template(template)
    with pytest.raises(ConfigurationError) as refused:
        load_settings(queue_url="q", work_queue_url="w", bucket="bkt", key_template=template)
    assert str(refused.value).startswith("BRANCHBUILD_KEY_TEMPLATE: ")
    assert reason in str(refused.value) and template in str(refused.value)


@pytest.mark.parametrize("template", ACCEPTED)
def test_key_templates_that_separate_branches_are_accepted(template: str) -> None:
    check_key_template(template)


def test_a_rules_key_is_checked_with_its_line_and_may_omit_the_repository_of_one() -> None:
    s = load_settings(queue_url="q", work_queue_url="w", bucket="bkt")
    text = (
        "version: 1\nrules:\n  - repository: a\n    on_delete: delete\n"
        "    key: '{repository}/{commit}.zip'\n"
    )
    with pytest.raises(ConfigurationError) as refused:
        parse_config(text, "p.yaml", s)
    assert str(refused.value).startswith("p.yaml:5: rules[0].key: must contain {branch} or {ref}")
    # One repository, named exactly: its keys need no {repository}; a glob's do.
    one = parse_config(text.replace("{repository}/{commit}", "a/mono/{branch}/{commit}"), "p", s)
    assert one.rule_for("a").key_template == "a/mono/{branch}/{commit}.zip"
    glob = text.replace("repository: a", "repository: 'a*'")
    with pytest.raises(ConfigurationError, match="must contain {repository}"):
        parse_config(glob.replace("{repository}/{commit}", "a/mono/{branch}/{commit}"), "p", s)


# -- the ledger document ----------------------------------------------------------------------


async def test_the_ledger_is_typed_and_written_by_compare_and_swap(aws: AwsResources) -> None:
    ledger = Ledger(Records(aws.s3, aws.bucket))
    archive = f"repo/a/{'a' * 40}.zip"
    assert await ledger.read(archive) is None
    entry = Entry(commit="a" * 40, ref="refs/heads/a", build_id="p:1", project="p")
    await ledger.started(archive, entry)
    assert await ledger.read(archive) == entry
    assert json.loads(await aws.object(archive + ".build.json")) == {
        "commit": "a" * 40,
        "ref": "refs/heads/a",
        "build_id": "p:1",
        "project": "p",
    }
    # The build's events moved it forward: recording the same build again keeps that.
    await ledger.update(archive, lambda e: e and replace(e, status="SUCCEEDED"))
    await ledger.started(archive, entry)
    assert (await ledger.read(archive)) == replace(entry, status="SUCCEEDED")
    # A newer build of the archive replaces it whole.
    await ledger.started(archive, replace(entry, build_id="p:2"))
    assert await ledger.read(archive) == replace(entry, build_id="p:2")
    # Two writers at once: both changes survive (a plain PUT would lose one).
    await ledger.started(archive, replace(entry, build_id="p:3"))

    async def mark(field: str) -> None:
        await ledger.update(archive, lambda e: e and replace(e, **{field: "x"}))

    async with anyio.create_task_group() as tg:
        tg.start_soon(mark, "logs")
        tg.start_soon(mark, "superseded_by")
    after = await ledger.read(archive)
    assert after is not None and (after.logs, after.superseded_by) == ("x", "x")


# -- the property: no operation on one branch touches another's objects ------------------------

_COMPONENT = st.text(alphabet=st.sampled_from("abz09-_.éß中x"), min_size=1, max_size=6).filter(
    lambda c: not c.startswith(".") and not c.endswith((".", ".lock"))
)


def _valid(name: str) -> bool:
    try:
        check_ref_name(name)
    except MalformedEvent:
        return False
    return True


BRANCH = st.lists(_COMPONENT, min_size=1, max_size=3).map("/".join).filter(_valid)
_SEGMENT = st.sampled_from(["{repository}", "{branch}", "{ref}", "ci", "x-{repository}"])
_LAST = st.sampled_from(["{commit}.zip", "{commit}", "c-{commit}.zip", "{commit}.tar"])


def _accepted(template: str) -> bool:
    try:
        check_key_template(template)
    except ValueError:
        return False
    return True


TEMPLATE = st.builds(
    lambda head, tail, last: "/".join([*head, *tail, last]),
    st.lists(_SEGMENT, min_size=1, max_size=3),
    st.lists(st.sampled_from(["{commit}", "v1"]), max_size=1),
    _LAST,
).filter(_accepted)

SHARED = "5" * 40  # one commit pushed to every branch


def _relatives(base: str) -> list[str]:
    """Names that trip a prefix match: the base's children, siblings and parents."""
    return [n for n in (base, f"{base}/x", f"{base}-x", f"x/{base}", f"{base}.zip") if _valid(n)]


@given(template=TEMPLATE, base=BRANCH, more=st.lists(BRANCH, max_size=2), victim=st.integers(0, 6))
@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(template="{repository}/{branch}/{commit}.zip", base="a", more=["a-b"], victim=0)
@example(template="{repository}/{ref}/{commit}.zip", base="a/b", more=["a"], victim=1)
async def test_no_operation_on_one_branch_touches_another_branchs_objects(
    aws: AwsResources, template: str, base: str, more: list[str], victim: int
) -> None:
    repository = f"r{uuid.uuid4().hex[:8]}"
    # Each example in its own bucket: what is left is what this example's operations left.
    aws = replace(aws, bucket=f"prop-{uuid.uuid4().hex[:16]}")
    await aws.s3.create_bucket(
        Bucket=aws.bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    # A merge build's branch (service.mergebuilds) beside the real branch of its name.
    names = list(dict.fromkeys([*_relatives(base), *more, merge_branch("7"), "pr/7"]))
    storage = Storage(aws.s3, aws.bucket, part_size=5 * MiB, concurrency=2, max_bytes=1 << 30)
    ledger = Ledger(Records(aws.s3, aws.bucket))
    settings_ = settings_for(aws, key_template=template, badges=True)
    rule = replace(
        Pipelines.from_settings(settings_).rule_for(repository), on_delete=OnDelete.DELETE
    )
    mine: dict[str, set[str]] = {}
    uploads: dict[str, str] = {}
    documents: dict[str, set[str]] = {}
    records = Records(aws.s3, aws.bucket)
    badges = Badges(records, settings_, Metrics())
    work = Queue(aws.sqs, aws.work_url, name="work")
    scheduler = Scheduler(records, settings_, Metrics(), Pipelines.from_settings(settings_), work)
    for index, name in enumerate(names):
        own = f"{index:x}".rjust(40, "a")
        keys: set[str] = set()
        for commit in (SHARED, own):
            push = push_for(repository, name, commit)
            key = archive_key(template, push)
            await aws.s3.put_object(Bucket=aws.bucket, Key=key, Body=name.encode())
            entry = Entry(commit=commit, ref=push.ref, build_id=f"p:{index}", project="p")
            await ledger.started(key, entry)
            keys |= {key, key + ".build.json"}
        stale = archive_key(template, push_for(repository, name, f"{index:x}".rjust(40, "b")))
        created = await aws.s3.create_multipart_upload(Bucket=aws.bucket, Key=stale)
        uploads[created["UploadId"]] = name
        mine[name] = keys
        # The branch's other documents, each written by its owner's key: its badge, its
        # waiting push, its current build, its notification records, and per archive its
        # feedback and merge documents (issue 25's, added after the property was written).
        entry = Entry(
            commit=own, ref=push.ref, build_id=f"p:{index}", project="p", repository=repository
        )
        assert await badges.publish_branch(entry)
        documents[name] = {
            badges_branch_key(repository, name),
            waiting_key(push),
            current_key(push),
            notify_branch_key(repository, push.ref),
            notify_build_key(key),
            key + FEEDBACK_SUFFIX,
            key + MERGE_SUFFIX,
        }
        for document in documents[name] - {badges_branch_key(repository, name)}:
            await records.write(document, {"push": name}, replacing=None)
    # Every branch has its own keys: nothing was overwritten by another branch.
    everything = [*mine.values(), *documents.values()]
    assert len(set.union(*everything)) == sum(len(k) for k in everything)
    before = await _etags(aws)

    gone = names[victim % len(names)]
    push = push_for(repository, gone, action=Action.DELETED)
    assert await storage.abort_stale(branch_keys(template, push_for(repository, gone))) == 1
    await scheduler.forget(push)  # what a deletion's job does before the clean-up
    await clean_up_branch(push, rule, storage, ledger)

    left = set(await aws.keys())
    after = await _etags(aws)
    for name, keys in documents.items():
        for key in keys - ({waiting_key(push)} if name == gone else set()):
            assert after.get(key) == before[key], f"deleting {gone!r} changed {key}"
    for name, keys in mine.items():
        if name == gone:
            assert not keys & left, f"{gone!r} under {template!r}: objects left"
            continue
        assert keys <= left, f"deleting {gone!r} under {template!r} took {name!r}'s objects"
        for key in keys:
            body = await aws.object(key)
            if key.endswith(".build.json"):
                assert json.loads(body)["ref"] == f"refs/heads/{name}"
            else:
                assert body == name.encode()
    reply = await aws.s3.list_multipart_uploads(Bucket=aws.bucket)
    open_ = {u["UploadId"] for u in reply.get("Uploads", [])}
    assert {uploads[u] for u in open_ if u in uploads} == set(names) - {gone}


async def _etags(aws: AwsResources) -> dict[str, str]:
    found: dict[str, str] = {}
    async for page in aws.s3.get_paginator("list_objects_v2").paginate(Bucket=aws.bucket):
        found |= {o["Key"]: o["ETag"] for o in page.get("Contents", [])}
    return found


async def test_a_tag_sharing_a_branchs_keys_survives_the_branchs_deletion(
    aws: AwsResources,
) -> None:
    """Under ``{branch}``, tag ``v1`` and branch ``v1`` share keys: the clean-up of the
    branch leaves an archive whose ledger entry names the tag."""
    template = "{repository}/{branch}/{commit}.zip"
    storage = Storage(aws.s3, aws.bucket, part_size=5 * MiB, concurrency=2, max_bytes=1 << 30)
    ledger = Ledger(Records(aws.s3, aws.bucket))
    tag = push_for("repo", "v1", "c" * 40, ref_type=RefType.TAG)
    branch = push_for("repo", "v1", "d" * 40)
    for push in (tag, branch):
        key = archive_key(template, push)
        await aws.s3.put_object(Bucket=aws.bucket, Key=key, Body=b"zip")
        assert push.commit is not None
        await ledger.started(key, Entry(push.commit, push.ref, "p:1", "p"))
    rule = replace(
        Pipelines.from_settings(settings_for(aws)).rule_for("repo"), on_delete=OnDelete.DELETE
    )
    deleted = push_for("repo", "v1", action=Action.DELETED)
    assert await clean_up_branch(deleted, rule, storage, ledger) == 2
    left = await aws.keys()
    assert sorted(left) == [f"repo/v1/{'c' * 40}.zip", f"repo/v1/{'c' * 40}.zip.build.json"]


# -- two rules' templates: never one key for two repositories ---------------------------------

_RULES = "version: 1\nrules:\n  - repository: {one}\n    key: '{key}'\n{rest}"
_STAR = "  - repository: '*'\n    tags: true\n"

# (a rule's key, its repository, the rules after it) -> what the refusal names
MEETING = {
    # The shipped example's old key: a repository named `monorepo` under the environment's
    # template has the same keys for its branch `x` as platform-monorepo's branch `x`.
    ("monorepo/{branch}/{commit}.zip", "platform-monorepo", _STAR): "rules[1]: BRANCHBUILD",
    ("monorepo/{branch}/{commit}.zip", "platform-monorepo", ""): "as BRANCHBUILD_KEY_TEMPLATE",
    # Repository `builds`, branch `web/x`: builds/web/x/<commit>.zip, as web's branch x.
    ("builds/{repository}/{branch}/{commit}.zip", "web", ""): "BRANCHBUILD_KEY_TEMPLATE",
    ("builds/{repository}/{branch}/{commit}.zip", "'web-*'", ""): "BRANCHBUILD_KEY_TEMPLATE",
    ("{branch}/{commit}.zip", "web", ""): "BRANCHBUILD_KEY_TEMPLATE",
    ("{repository}-x/{branch}/{commit}.zip", "'w*'", ""): "BRANCHBUILD_KEY_TEMPLATE",
    # Two one-repository rules writing under one prefix.
    (
        "shared/{branch}/{commit}.zip",
        "a",
        "  - repository: b\n    key: 'shared/{ref}/{commit}'\n",
    ): ("rules[1].key: 'shared/{ref}/{commit}' can name the same object as rules[0].key"),
}
APART = (
    ("platform-monorepo/payments/{branch}/{commit}.zip", "platform-monorepo", _STAR),
    ("{repository}/payments/{branch}/{commit}.zip", "platform-monorepo", ""),
    ("{repository}/{ref}/{commit}.zip", "'web-*'", ""),  # {repository} pins the repository
    ("ci~/{repository}/{branch}/{commit}.zip", "'web-*'", ""),  # no repository has a ~
    ("a/{branch}/{commit}.zip", "a", "  - repository: b\n    key: 'b/{branch}/{commit}'\n"),
    (
        "monorepo/{branch}/{commit}.zip",
        "platform-monorepo",
        "  - repository: '*'\n    key: 'all/{repository}/{branch}/{commit}.zip'\n",
    ),
)


@pytest.mark.parametrize(("key", "one", "rest"), sorted(MEETING))
def test_two_rules_whose_keys_can_meet_are_refused(key: str, one: str, rest: str) -> None:
    s = load_settings(queue_url="q", work_queue_url="w", bucket="bkt")
    with pytest.raises(ConfigurationError) as refused:
        parse_config(_RULES.format(one=one, key=key, rest=rest), "p.yaml", s)
    assert MEETING[(key, one, rest)] in str(refused.value)
    assert "for another repository" in str(refused.value)


@pytest.mark.parametrize(("key", "one", "rest"), APART)
def test_rules_whose_keys_never_meet_are_accepted(key: str, one: str, rest: str) -> None:
    s = load_settings(queue_url="q", work_queue_url="w", bucket="bkt")
    parse_config(_RULES.format(one=one, key=key, rest=rest), "p.yaml", s)


_NAMES = st.sampled_from(["ci", "a", "x-a", "x-ci", "web", "builds", "v1"])
_RULE_SEGMENT = st.sampled_from(["{repository}", "x-{repository}", "ci", "a", "builds", "x-a"])


def _rule_template(one_repository: bool) -> st.SearchStrategy[str]:
    def accepted(template: str) -> bool:
        try:
            check_key_template(template, one_repository=one_repository)
        except ValueError:
            return False
        return True

    return st.builds(
        lambda head, branch, last: "/".join([*head, branch, last]),
        st.lists(_RULE_SEGMENT, max_size=2),
        st.sampled_from(["{branch}", "{ref}"]),
        st.sampled_from(["{commit}.zip", "{commit}"]),
    ).filter(accepted)


@given(
    first=_rule_template(True),
    second=_rule_template(False),
    one=_NAMES,
    others=st.lists(_NAMES, min_size=1, max_size=3),
    branches=st.lists(BRANCH | _NAMES, min_size=1, max_size=3),
)
@settings(max_examples=300, deadline=None)
@example(
    first="monorepo/{branch}/{commit}.zip",
    second="{repository}/{branch}/{commit}.zip",
    one="platform-monorepo",
    others=["monorepo"],
    branches=["x"],
)
def test_rules_the_configuration_accepts_never_share_a_key(
    first: str, second: str, one: str, others: list[str], branches: list[str]
) -> None:
    """Over two rules (one repository's, then every other's, or the environment's), any
    configuration accepted gives a branch of one repository no key of another's, and one
    branch's keys (``branch_keys``) never own another's archive."""
    s = load_settings(queue_url="q", work_queue_url="w", bucket="bkt", key_template=second)
    text = f"version: 1\nrules:\n  - repository: {one}\n    key: '{first}'\n"
    try:
        config = parse_config(text, "p", s)
    except ConfigurationError:
        return
    owners: dict[str, tuple[str, str]] = {}
    for repository in dict.fromkeys([one, *others]):
        template = config.rule_for(repository).key_template
        for branch in branches:
            push = push_for(repository, branch, SHARED)
            key = archive_key(template, push)
            assert owners.setdefault(key, (repository, branch)) == (repository, branch), key
    for key, (repository, branch) in owners.items():
        template = config.rule_for(repository).key_template
        for other, (other_repository, other_branch) in owners.items():
            if other != key:
                keys = branch_keys(template, push_for(repository, branch))
                assert not keys.owns(other), (
                    f"{repository} {branch} owns {other_repository} {other_branch}'s {other}"
                )


# -- pull request events find the archive under the rule's own key template ------------------


async def test_a_pull_request_event_uses_the_rules_key_template(aws: AwsResources) -> None:
    s = settings_for(aws, pull_request_feedback="comment")
    config = parse_config(
        "version: 1\nrules:\n  - repository: shop\n    key: 'shop/ci/{branch}/{commit}.zip'\n",
        "p",
        s,
    )
    commit = "e" * 40
    archive = f"shop/ci/feature/pay/{commit}.zip"
    records = Records(aws.s3, aws.bucket)
    await records.write(archive + FEEDBACK_SUFFIX, {"build_id": "p:1"}, replacing=None)
    event = {
        "source": "aws.codecommit",
        "account": "123456789012",
        "detail-type": "CodeCommit Pull Request State Change",
        "detail": {
            "event": "pullRequestCreated",
            "pullRequestId": "1",
            "pullRequestStatus": "OPEN",
            "repositoryNames": ["shop"],
            "sourceReference": "refs/heads/feature/pay",
            "sourceCommit": commit,
        },
    }
    async with AsyncExitStack() as stack:
        clients = await open_clients(stack, max_pool=2)
        pull_requests = PullRequests(
            AccountClients(clients, stack, ""), records, s, Metrics(), Pipelines(config)
        )
        # "recorded": it found the build's feedback document (today's code looked under the
        # environment's template, found nothing and answered "ignored").
        assert await pull_requests.event(json.dumps(event)) == "recorded"
