"""Trust boundaries of deploy/, beyond tests/test_iam.py's negative suite: the grants added after
the IAM proof (merge builds' CodeCommit calls, the scheduler's BatchGetBuilds, notifications),
the CodeBuild projects' and the ECS agent's roles, every KMS grant of every template, and what
deploy/examples/pipelines.yaml needs as the walkthrough (docs/deploying.md) deploys it. Each
request is evaluated with the proof's evaluator (@cloud-copilot/iam-simulate), each refusal
beside an allowed request like it, so that a denial is not merely a typo.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import aioboto3
import pytest
from aiobotocore.config import AioConfig

from service.aws import AccountClients, Clients, watch_calls
from service.errors import BranchbuildError, ConfigurationError, RejectedEvent
from service.mergebuilds import MergeBuilds
from service.metrics import Metrics
from service.pipelines import Pipelines, parse_config
from service.queue import Queue
from service.records import Records
from service.settings import load_settings
from tests.cfn import ROOT, Stack
from tests.helpers import AwsResources
from tests.test_iam import (
    ACCOUNT,
    HTTPS,
    PREFIX,
    PULL_REQUEST_ROLE,
    REGION,
    REPOSITORY_ACCOUNT,
    Deployment,
    Request,
    _ask,
    deployment,
    simulate,
    walkthrough,
)
from tests.test_worker import settings_for

PROJECT = f"arn:aws:codebuild:{REGION}:{ACCOUNT}:project/"
BUCKET = "arn:aws:s3:::branchbuild-artifacts/"
KEY = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/k-1"
VIA = "kms:ViaService"
# The example's placeholder account (deploy/examples/pipelines.yaml) is the pipeline account.
EXAMPLE_ACCOUNT = "111122223333"


def _judge(cases: list[tuple[Request, bool]]) -> list[str]:
    """The cases whose result is not the one wanted (True: must be allowed)."""
    results = simulate([request for request, _ in cases])
    return [
        f"{request.role} {request.action} {request.resource} {dict(request.context or {})}: "
        f"{result}"
        for (request, must_allow), result in zip(cases, results, strict=True)
        if (result == "Allowed") != must_allow
    ]


@contextlib.contextmanager
def _environment_of(d: Deployment) -> Iterator[None]:
    """The service container's environment as the stack sets it (secrets aside), as the only
    BRANCHBUILD_* variables: load_settings() then reads what a deployed service reads."""
    [task] = d.service.of_type("AWS::ECS::TaskDefinition")
    [container] = d.service.properties(task)["ContainerDefinitions"]
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("BRANCHBUILD_")]:
            patch.delenv(name)
        for entry in container["Environment"]:
            patch.setenv(entry["Name"], str(entry["Value"]))
        yield


def _key_policy() -> dict[str, Any]:
    """A key's default policy: the account's IAM policies decide."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }


def test_grants_added_after_the_proof_stop_at_their_resources() -> None:
    """Merge builds' CodeCommit calls (task role and the repository account's role), the
    scheduler's and operators' CodeBuild reads, notifications: each on its own resources only."""
    d = walkthrough()
    own = f"arn:aws:codecommit:{REGION}:{ACCOUNT}:"
    theirs = f"arn:aws:codecommit:{REGION}:{REPOSITORY_ACCOUNT}:"
    topic = f"arn:aws:sns:{REGION}:{ACCOUNT}:"
    merge = "codecommit:CreateUnreferencedMergeCommit"
    conflicts = "codecommit:GetMergeConflicts"
    cases = [
        # Merge builds: the listed repositories of each account, nothing else.
        (_ask(d, "service", merge, own + "shop"), True),
        (_ask(d, "service", merge, own + "payroll"), False),
        (_ask(d, "service", conflicts, own + "payroll"), False),
        (_ask(d, "service", merge, theirs + "shop"), False),  # only with the assumed role
        (_ask(d, "pull-requests", merge, theirs + "shop"), True),
        (_ask(d, "pull-requests", conflicts, theirs + "shop"), True),
        (_ask(d, "pull-requests", merge, theirs + "payroll"), False),
        (_ask(d, "pull-requests", conflicts, theirs + "payroll"), False),
        (_ask(d, "pull-requests", "codecommit:MergePullRequestByThreeWay", theirs + "shop"), False),
        (_ask(d, "service", "codecommit:MergePullRequestByThreeWay", own + "shop"), False),
        # The scheduler's running set and the operators' reads: the prefix's projects only.
        (_ask(d, "service", "codebuild:BatchGetBuilds", PROJECT + "bb-app"), True),
        (_ask(d, "service", "codebuild:BatchGetBuilds", PROJECT + "deploy-prod"), False),
        (_ask(d, "service", "codebuild:RetryBuild", PROJECT + "bb-app"), False),
        (_ask(d, "service", "codebuild:UpdateProject", PROJECT + "bb-app"), False),
        (_ask(d, "admin", "codebuild:BatchGetBuilds", PROJECT + "bb-app"), True),
        (_ask(d, "admin", "codebuild:BatchGetBuilds", PROJECT + "deploy-prod"), False),
        (_ask(d, "admin", "codebuild:ListBuildsForProject", PROJECT + "deploy-prod"), False),
        (_ask(d, "admin", "codebuild:StartBuild", PROJECT + "bb-app"), False),
        # StartBuild's serviceRoleOverride needs iam:PassRole: a build never runs under
        # another role than its project's, whoever asks.
        (_ask(d, "service", "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/deploy"), False),
        (_ask(d, "admin", "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/deploy"), False),
        # Notifications: the listed topic, not one of the same name elsewhere.
        (_ask(d, "service", "sns:Publish", topic + "branchbuild-notifications"), True),
        (
            _ask(
                d,
                "service",
                "sns:Publish",
                f"arn:aws:sns:{REGION}:999999999999:branchbuild-notifications",
            ),
            False,
        ),
        (
            _ask(
                d,
                "service",
                "sns:Publish",
                f"arn:aws:sns:us-east-1:{ACCOUNT}:branchbuild-notifications",
            ),
            False,
        ),
        (_ask(d, "service", "sns:Subscribe", topic + "branchbuild-notifications"), False),
        # Writes stay in the service's own bucket.
        (_ask(d, "service", "s3:PutObject", BUCKET + "badges~/app/main.svg"), True),
        (_ask(d, "service", "s3:PutObject", "arn:aws:s3:::someone-elses/badges~/x.svg"), False),
        (_ask(d, "service", "s3:DeleteObject", "arn:aws:s3:::someone-elses/app/x.zip"), False),
        (_ask(d, "service", "s3:PutBucketPolicy", "arn:aws:s3:::branchbuild-artifacts"), False),
    ]
    wrong = _judge(cases)
    assert not wrong, "\n".join(wrong)


def test_without_repository_accounts_the_role_is_assumed_in_this_account_only() -> None:
    """PullRequestRoleName without RepositoryAccountIds: BRANCHBUILD_ALLOWED_ACCOUNTS is this
    account, and so is the only account where the task role may assume the role."""
    d = deployment(PullRequestRoleName=PULL_REQUEST_ROLE)
    role = f":role/{PULL_REQUEST_ROLE}"
    wrong = _judge(
        [
            (_ask(d, "service", "sts:AssumeRole", f"arn:aws:iam::{ACCOUNT}{role}"), True),
            (
                _ask(d, "service", "sts:AssumeRole", f"arn:aws:iam::{REPOSITORY_ACCOUNT}{role}"),
                False,
            ),
        ]
    )
    assert not wrong, "\n".join(wrong)


def _project(d: Deployment, **parameters: str) -> tuple[str, list[dict[str, Any]]]:
    stack = Stack(
        "branchbuild-project-app",
        "codebuild-project.yaml",
        {"RepositoryName": "app", "ProjectNamePrefix": PREFIX} | parameters,
        account=ACCOUNT,
        region=REGION,
        imports=d.pipeline.exports(),
    )
    return stack.arn("ServiceRole"), [
        p["PolicyDocument"] for p in stack.properties("ServiceRole")["Policies"]
    ]


def test_a_projects_role_and_the_ecs_agents_role_stop_at_their_resources() -> None:
    """A build reads its archives, writes its outputs and retries its own builds, in its
    repository only; the key only through S3. The ECS agent reads its one secret, whose key
    only through Secrets Manager."""
    secret_key = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/k-2"
    d = walkthrough(KmsKeyArn=KEY, SecretKmsKeyArn=secret_key)
    principal, policies = _project(d, KmsKeyArn=KEY)

    def build(action: str, resource: str, **context: str) -> Request:
        policy = _key_policy() if resource.startswith("arn:aws:kms:") else None
        policy = policy or d.resource_policy(resource)
        return Request("build", principal, action, resource, policies, policy, HTTPS | context)

    agent_principal, agent_policies = d.role_policies("execution")
    secret = str(d.service.parameters["SshSecretArn"])

    def agent(action: str, resource: str, **context: str) -> Request:
        policy = _key_policy() if resource.startswith("arn:aws:kms:") else None
        return Request(
            "execution", agent_principal, action, resource, agent_policies, policy, HTTPS | context
        )

    wrong = _judge(
        [
            (build("s3:GetObject", BUCKET + "app/main/x.zip"), True),
            (build("s3:GetObject", BUCKET + "web/main/x.zip"), False),
            (build("s3:GetObject", BUCKET + "branchbuild-state/running.json"), False),
            (build("s3:PutObject", BUCKET + "app/main/abc/out.txt"), True),
            (build("s3:PutObject", BUCKET + "web/main/abc/out.txt"), False),
            (build("s3:PutObject", BUCKET + "badges~/app/main.svg"), False),
            (
                build(
                    "s3:ListBucket", "arn:aws:s3:::branchbuild-artifacts", **{"s3:prefix": "app/"}
                ),
                True,
            ),
            (
                build(
                    "s3:ListBucket", "arn:aws:s3:::branchbuild-artifacts", **{"s3:prefix": "web/"}
                ),
                False,
            ),
            (build("codebuild:RetryBuild", PROJECT + "bb-app"), True),
            (build("codebuild:RetryBuild", PROJECT + "bb-web"), False),
            (build("codebuild:StartBuild", PROJECT + "bb-app"), False),
            (build("codecommit:GitPull", f"arn:aws:codecommit:{REGION}:{ACCOUNT}:app"), False),
            (build("kms:Decrypt", KEY, **{VIA: f"s3.{REGION}.amazonaws.com"}), True),
            (build("kms:Decrypt", KEY), False),
            (build("kms:Decrypt", KEY, **{VIA: f"sqs.{REGION}.amazonaws.com"}), False),
            (agent("secretsmanager:GetSecretValue", secret), True),
            (agent("secretsmanager:GetSecretValue", secret.replace("ssh-", "other-")), False),
            (
                agent("kms:Decrypt", secret_key, **{VIA: f"secretsmanager.{REGION}.amazonaws.com"}),
                True,
            ),
            (agent("kms:Decrypt", secret_key), False),
            (agent("kms:Decrypt", KEY, **{VIA: f"secretsmanager.{REGION}.amazonaws.com"}), False),
        ]
    )
    assert not wrong, "\n".join(wrong)


def _statements(stack: Stack) -> list[tuple[str, dict[str, Any]]]:
    """Every statement of every identity policy (roles' and managed) of a stack."""
    found = []
    for logical in stack.of_type("AWS::IAM::Role"):
        for policy in stack.properties(logical).get("Policies", []):
            found += [(logical, s) for s in policy["PolicyDocument"]["Statement"]]
    for logical in stack.of_type("AWS::IAM::ManagedPolicy"):
        found += [(logical, s) for s in stack.properties(logical)["PolicyDocument"]["Statement"]]
    return found


def test_every_kms_grant_of_every_template_goes_through_a_service() -> None:
    """kms:ViaService on every Allow of a kms: action, in every template that can grant one, with
    every key parameter given: a role never calls KMS itself."""
    d = walkthrough(
        KmsKeyArn=KEY,
        SecretKmsKeyArn=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/k-2",
        EcrRepositoryArn=f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/branchbuild",
    )
    project = Stack(
        "branchbuild-project-app",
        "codebuild-project.yaml",
        {"RepositoryName": "app", "ProjectNamePrefix": PREFIX, "KmsKeyArn": KEY},
        account=ACCOUNT,
        region=REGION,
        imports=d.pipeline.exports(),
    )
    stacks = [d.pipeline, d.service, project]
    if d.repository is not None:
        stacks.append(d.repository)
    kms = [
        (logical, statement)
        for stack in stacks
        for logical, statement in _statements(stack)
        if statement["Effect"] == "Allow"
        and any(str(a).startswith("kms:") for a in _actions(statement))
    ]
    # The task role's two keys, the operators', the ECS agent's and the project's.
    assert len(kms) == 5, kms
    unconditioned = [
        f"{logical}: {statement.get('Sid')}"
        for logical, statement in kms
        if VIA not in statement.get("Condition", {}).get("StringEquals", {})
    ]
    assert not unconditioned, unconditioned


def _actions(statement: dict[str, Any]) -> list[str]:
    actions = statement.get("Action", [])
    return [actions] if isinstance(actions, str) else list(actions)


def test_the_example_configurations_merge_builds_and_notifications_are_allowed() -> None:
    """deploy/examples/pipelines.yaml as docs/deploying.md deploys it (step 7's parameters for
    the example): its merge build's CodeCommit calls on its repository, and its notifications
    to the topics its rules name, are allowed, with the walkthrough's own topic."""
    settings = load_settings(
        queue_url="q",
        work_queue_url="w",
        bucket="bucket",
        project_prefix=PREFIX,
        project_template=PREFIX + "{repository}",
        allowed_accounts=EXAMPLE_ACCOUNT,
    )
    example = ROOT / "deploy" / "examples" / "pipelines.yaml"
    config = parse_config(example.read_text(), str(example), settings)
    merged = [
        repository
        for repository in ("platform-monorepo", "web-shop", "mobile-app", "other")
        if config.rule_for(repository).merge_build
    ]
    topics = {
        topic.replace(f":{EXAMPLE_ACCOUNT}:", f":{ACCOUNT}:")
        for repository in ("platform-monorepo", "web-shop", "mobile-app", "other")
        for topic in config.rule_for(repository).notify_topics
    }
    assert merged == ["platform-monorepo"] and topics  # what the example shows
    walkthrough_topic = f"arn:aws:sns:{REGION}:{ACCOUNT}:branchbuild-builds"
    d = deployment(
        PullRequestRepositoryArns=f"arn:aws:codecommit:{REGION}:{ACCOUNT}:platform-monorepo",
        NotifyTopicArns=walkthrough_topic,
        NotifyRuleTopicArns=",".join(sorted(topics)),
    )
    own = f"arn:aws:codecommit:{REGION}:{ACCOUNT}:"
    cases = [
        (_ask(d, "service", f"codecommit:{operation}", own + repository), True)
        for repository in merged
        for operation in (
            "ListPullRequests",
            "GetPullRequest",
            "CreateUnreferencedMergeCommit",
            "GetMergeConflicts",
        )
    ]
    cases += [(_ask(d, "service", "sns:Publish", topic), True) for topic in sorted(topics)]
    cases += [
        (_ask(d, "service", "sns:Publish", walkthrough_topic), True),
        (_ask(d, "service", "codecommit:CreateUnreferencedMergeCommit", own + "web-shop"), False),
        (_ask(d, "service", "sns:Publish", f"arn:aws:sns:{REGION}:{ACCOUNT}:other"), False),
    ]
    wrong = _judge(cases)
    assert not wrong, "\n".join(wrong)
    # A rule topic is not a default one: only NotifyTopicArns is BRANCHBUILD_NOTIFY_TOPICS.
    [task] = d.service.of_type("AWS::ECS::TaskDefinition")
    [container] = d.service.properties(task)["ContainerDefinitions"]
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["BRANCHBUILD_NOTIFY_TOPICS"] == walkthrough_topic
    # The service loads the example (your account in it) with what the stack sets, and
    # refuses it without NotifyRuleTopicArns (no notification it could not publish).
    text = example.read_text().replace(EXAMPLE_ACCOUNT, ACCOUNT)
    with _environment_of(d):
        config = parse_config(text, str(example), load_settings())
    assert config.rule_for("platform-monorepo").notify_topics
    without = deployment(NotifyTopicArns=walkthrough_topic)
    with (
        _environment_of(without),
        pytest.raises(ConfigurationError, match=r"rules\[0\]\.notify\.topics"),
    ):
        parse_config(text, str(example), load_settings())
    # Rule topics alone: published to, and no default topic.
    alone = deployment(NotifyRuleTopicArns=",".join(sorted(topics)))
    [task] = alone.service.of_type("AWS::ECS::TaskDefinition")
    [container] = alone.service.properties(task)["ContainerDefinitions"]
    assert "BRANCHBUILD_NOTIFY_TOPICS" not in {e["Name"] for e in container["Environment"]}
    wrong = _judge(
        [(_ask(alone, "service", "sns:Publish", topic), True) for topic in sorted(topics)]
        + [(_ask(alone, "service", "sns:Publish", walkthrough_topic), False)]
    )
    assert not wrong, "\n".join(wrong)


class _Calls(logging.Handler):
    """The aws_call records of this process (service.aws.watch_calls)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.calls: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        call = getattr(record, "aws_call", None)
        if call is not None:
            self.calls.append(call)


def _pull_request_event(account: str) -> str:
    return json.dumps(
        {
            "detail-type": "CodeCommit Pull Request State Change",
            "source": "aws.codecommit",
            "account": account,
            "region": REGION,
            "resources": [f"arn:aws:codecommit:{REGION}:{account}:shop"],
            "detail": {
                "event": "pullRequestCreated",
                "pullRequestId": "1",
                "pullRequestStatus": "OPEN",
                "repositoryNames": ["shop"],
                "sourceReference": "refs/heads/feature/pay",
                "sourceCommit": "a" * 40,
                "destinationReference": "refs/heads/main",
                "destinationCommit": "b" * 40,
            },
        }
    )


async def test_a_merge_build_event_of_an_unlisted_account_assumes_nothing(
    aws: AwsResources,
) -> None:
    """Merge builds (feedback off, so the merge builds alone hear the event) refuse an event
    naming an account not in BRANCHBUILD_ALLOWED_ACCOUNTS before any AWS call: no role is
    assumed there, whoever sent the event; a listed account's event assumes the role there."""
    settings = settings_for(
        aws,
        pull_request_role_template="arn:aws:iam::{account}:role/branchbuild-pr",
        allowed_accounts=(ACCOUNT,),
    )
    rules = "version: 1\nrules:\n  - repository: shop\n    pull_requests: {merge_build: true}\n"
    pipelines = Pipelines(parse_config(rules, "pipelines.yaml", settings))
    session = aioboto3.Session()
    watch_calls(session, role="service")
    logger = logging.getLogger("branchbuild.aws")
    seen = _Calls()
    level = logger.level
    logger.addHandler(seen)
    logger.setLevel(logging.DEBUG)
    try:
        async with AsyncExitStack() as stack:
            codecommit = await stack.enter_async_context(session.client("codecommit"))
            once = AioConfig(retries={"max_attempts": 1})  # moto answers 500: no retries
            clients = Clients(aws.sqs, aws.s3, aws.codebuild, codecommit, session, once)
            merges = MergeBuilds(
                AccountClients(clients, stack, settings.pull_request_role_template),
                Records(aws.s3, aws.bucket),
                settings,
                Metrics(),
                pipelines,
                Queue(aws.sqs, aws.work_url, name="work"),
            )
            with pytest.raises(
                RejectedEvent, match="account '999999999999' is not in BRANCHBUILD_ALLOWED_ACCOUNTS"
            ):
                await merges.event(_pull_request_event("999999999999"))
            assert seen.calls == []
            with contextlib.suppress(BranchbuildError):  # moto has no pull requests
                await merges.event(_pull_request_event(ACCOUNT))
    finally:
        logger.removeHandler(seen)
        logger.setLevel(level)
    assumed = [c["resources"].get("RoleArn") for c in seen.calls if c["operation"] == "AssumeRole"]
    assert assumed == [f"arn:aws:iam::{ACCOUNT}:role/branchbuild-pr"]


def test_a_reconciliation_account_outside_the_allowed_ones_is_refused_at_load() -> None:
    """reconcile.account names the account of the pushes the reconciliation queues; one not in
    BRANCHBUILD_ALLOWED_ACCOUNTS would have every such push refused, silently: the file is
    refused instead, naming the line (as the example would be, copied unchanged)."""
    text = 'version: 1\nrules: []\nreconcile:\n  repositories: [shop]\n  account: "111122223333"\n'
    allowed = {"queue_url": "q", "work_queue_url": "w", "bucket": "bucket"}
    with pytest.raises(
        ConfigurationError,
        match=r"p.yaml:5: reconcile.account: '111122223333' is not in BRANCHBUILD_ALLOWED_ACCOUNTS",
    ):
        parse_config(text, "p.yaml", load_settings(**allowed, allowed_accounts=ACCOUNT))
    listed = load_settings(**allowed, allowed_accounts=f"{ACCOUNT},111122223333")
    assert parse_config(text, "p.yaml", listed).reconcile_account == "111122223333"
    # No allow-list: every account is accepted, and so is this one.
    assert parse_config(text, "p.yaml", load_settings(**allowed)).reconcile_account


def test_a_rule_topic_the_deployment_may_not_publish_to_is_refused_at_load() -> None:
    """deploy/service.yaml tells the service which topics the task role may publish to
    (NotifyTopicArns, NotifyRuleTopicArns): a rule naming another is refused at load, naming
    the line, instead of every notification being refused by IAM. Without a deployment
    saying so (local development), any topic."""
    team = f"arn:aws:sns:{REGION}:{ACCOUNT}:payments-builds"
    default = f"arn:aws:sns:{REGION}:{ACCOUNT}:branchbuild-builds"
    text = (
        "version: 1\nrules:\n  - repository: pay\n    notify:\n"
        f'      topics: ["{team}"]\n  - repository: "*"\n'
    )
    for stack in (deployment(NotifyTopicArns=default), deployment()):
        with (
            _environment_of(stack),
            pytest.raises(
                ConfigurationError,
                match=rf"p.yaml:5: rules\[0\]\.notify\.topics: '{team}' is not among the topics",
            ),
        ):
            parse_config(text, "p.yaml", load_settings())
    # With the topic in NotifyRuleTopicArns: loaded, and the other rules keep the default.
    with _environment_of(deployment(NotifyTopicArns=default, NotifyRuleTopicArns=team)):
        config = parse_config(text, "p.yaml", load_settings())
    assert config.rule_for("pay").notify_topics == (team,)
    assert config.rule_for("other").notify_topics == (default,)
    local = load_settings(queue_url="q", work_queue_url="w", bucket="bucket")
    assert parse_config(text, "p.yaml", local).rule_for("pay").notify_topics == (team,)


def test_the_runbooks_aws_cli_redrive_is_allowed_to_operators_as_aws_authorizes_it() -> None:
    """deploy/README.md's dead letters, with the AWS CLI and a customer managed key: SQS
    authorizes start-message-move-task with StartMessageMoveTask, ReceiveMessage, DeleteMessage
    and GetQueueAttributes on the dead-letter queue and SendMessage on the queue it returns to
    (SQS developer guide, "Configuring queue permissions for dead-letter queue redrive"); the
    delivery dead-letter queue's events are read, re-sent to the intake queue (through its
    policy) and deleted. The operators move nothing out of a queue that is not a dead-letter
    one."""
    d = walkthrough(KmsKeyArn=KEY)
    sqs = f"arn:aws:sqs:{REGION}:{ACCOUNT}:branchbuild-"
    via = {VIA: f"sqs.{REGION}.amazonaws.com"}
    allowed = [
        (action, f"{sqs}{dlq}-dlq.fifo")
        for dlq in ("work", "intake")
        for action in (
            "sqs:StartMessageMoveTask",
            "sqs:ListMessageMoveTasks",
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:GetQueueAttributes",
        )
    ]
    allowed += [("sqs:SendMessage", f"{sqs}work.fifo"), ("sqs:SendMessage", f"{sqs}intake.fifo")]
    allowed += [
        (action, f"{sqs}delivery-dlq")
        for action in ("sqs:GetQueueAttributes", "sqs:ReceiveMessage", "sqs:DeleteMessage")
    ]
    cases = [(_ask(d, "admin", action, resource), True) for action, resource in allowed]
    cases += [
        (_ask(d, "admin", a, KEY, **via), True) for a in ("kms:Decrypt", "kms:GenerateDataKey")
    ]
    cases += [
        (_ask(d, "admin", "sqs:StartMessageMoveTask", f"{sqs}intake.fifo"), False),
        (_ask(d, "admin", "sqs:StartMessageMoveTask", f"{sqs}delivery-dlq"), False),
        (_ask(d, "admin", "sqs:SendMessage", f"{sqs}delivery-dlq"), False),
        (_ask(d, "admin", "sqs:PurgeQueue", f"{sqs}work-dlq.fifo"), False),
        (_ask(d, "admin", "sqs:DeleteMessage", f"{sqs}intake.fifo"), False),
    ]
    wrong = _judge(cases)
    assert not wrong, "\n".join(wrong)
