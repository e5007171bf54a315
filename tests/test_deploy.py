"""Static checks of deploy/ and the Dockerfile: the facts the service relies on.

`make lint-deploy` (part of `make test`) runs cfn-lint, checkov, hadolint and promtool; these
tests check what no linter knows: that the templates and the image agree with the service.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from service.cli import main as cli_main
from service.settings import Settings
from tests.cfn import DEPLOY, ROOT, load

template = load  # deploy/<name>, CloudFormation's short-form tags kept (tests/cfn.py)


def resources(name: str, kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template(name)["Resources"].items() if v["Type"] == kind}


def test_pipeline_queues_and_rule() -> None:
    queues = resources("pipeline.yaml", "AWS::SQS::Queue")
    fifo = {k: v["Properties"] for k, v in queues.items() if v["Properties"].get("FifoQueue")}
    assert len(fifo) == 4
    for props in fifo.values():
        assert str(props["QueueName"]["Sub"]).endswith(".fifo")
    intake, work = fifo["IntakeQueue"], fifo["WorkQueue"]
    assert intake["ContentBasedDeduplication"] is True
    for queue in (intake, work):
        assert queue["RedrivePolicy"]["maxReceiveCount"] == {"Ref": "MaxReceiveCount"}
    params = template("pipeline.yaml")["Parameters"]
    assert params["MaxReceiveCount"]["Default"] == 2
    # The queue's own timeout applies only to receives that name none (the service's name
    # BRANCHBUILD_VISIBILITY_TIMEOUT); it must not be shorter.
    assert (
        params["WorkVisibilityTimeout"]["Default"]
        == Settings.model_fields["visibility_timeout"].default
    )
    assert (
        params["IntakeVisibilityTimeout"]["Default"]
        == Settings.model_fields["intake_visibility_timeout"].default
    )
    rule = resources("pipeline.yaml", "AWS::Events::Rule")["PushRule"]
    pattern = rule["Properties"]["EventPattern"]
    assert pattern["source"] == ["aws.codecommit"]
    assert pattern["detail-type"] == ["CodeCommit Repository State Change"]
    assert sorted(pattern["detail"]["event"]) == [
        "referenceCreated",
        "referenceDeleted",
        "referenceUpdated",
    ]
    [target] = rule["Properties"]["Targets"]
    assert target["SqsParameters"]["MessageGroupId"]
    outputs = template("pipeline.yaml")["Outputs"]
    for name in (
        "IntakeQueueUrl",
        "WorkQueueUrl",
        "IntakeDeadLetterQueueUrl",
        "WorkDeadLetterQueueUrl",
        "BucketName",
    ):
        assert name in outputs


def test_build_state_rule_sends_only_branchbuilds_builds_to_their_own_lane() -> None:
    rules = resources("pipeline.yaml", "AWS::Events::Rule")
    props = rules["BuildStateRule"]["Properties"]
    pattern = props["EventPattern"]
    assert pattern["source"] == ["aws.codebuild"]
    assert pattern["detail-type"] == ["CodeBuild Build State Change"]
    variables = pattern["detail"]["additional-information"]["environment"]
    assert variables["environment-variables"]["name"] == ["BRANCHBUILD_ARCHIVE"]
    [target] = props["Targets"]
    assert target["Arn"] == {"GetAtt": "IntakeQueue.Arn"}
    push_group = rules["PushRule"]["Properties"]["Targets"][0]["SqsParameters"]["MessageGroupId"]
    assert target["SqsParameters"]["MessageGroupId"] not in {push_group, ""}
    policy = resources("pipeline.yaml", "AWS::SQS::QueuePolicy")["IntakeQueuePolicy"]
    sources = [
        s["Condition"]["ArnEquals"]["aws:SourceArn"]
        for s in policy["Properties"]["PolicyDocument"]["Statement"]
        if s["Effect"] == "Allow"
    ]
    assert {"GetAtt": "BuildStateRule.Arn"} in sources


def test_pull_request_events_reach_the_intake_and_are_forwarded_from_repository_accounts() -> None:
    rules = resources("pipeline.yaml", "AWS::Events::Rule")
    props = rules["PullRequestRule"]["Properties"]
    assert props["EventPattern"]["detail-type"] == ["CodeCommit Pull Request State Change"]
    assert sorted(props["EventPattern"]["detail"]["event"]) == [
        "pullRequestCreated",
        "pullRequestSourceBranchUpdated",
    ]
    assert props["Targets"][0]["Arn"] == {"GetAtt": "IntakeQueue.Arn"}
    [forward] = resources("multi-account/repository-account.yaml", "AWS::Events::Rule").values()
    pattern = forward["Properties"]["EventPattern"]
    assert "CodeCommit Pull Request State Change" in pattern["detail-type"]
    assert set(props["EventPattern"]["detail"]["event"]) <= set(pattern["detail"]["event"])
    role = resources("multi-account/repository-account.yaml", "AWS::IAM::Role")
    feedback = role["PullRequestFeedbackRole"]["Properties"]
    [statement] = feedback["Policies"][0]["PolicyDocument"]["Statement"]
    assert statement["Resource"] == {"Ref": "RepositoryArns"}
    assert all(action.startswith("codecommit:") for action in statement["Action"])


def test_task_role_grants_pull_request_calls_on_repositories_and_one_role_only() -> None:
    role = resources("service.yaml", "AWS::IAM::Role")["TaskRole"]["Properties"]
    statements = {
        e["If"][1]["Sid"]: e["If"][1] if "If" in e else e
        for e in role["Policies"][0]["PolicyDocument"]["Statement"]
        if "If" in e and isinstance(e["If"][1], dict)
    }
    feedback = statements["PullRequestFeedback"]
    assert feedback["Resource"] == {"Ref": "PullRequestRepositoryArns"}
    assume = statements["AssumePullRequestRole"]
    assert assume["Action"] == "sts:AssumeRole"
    assert assume["Resource"]["Sub"].endswith(":role/${PullRequestRoleName}")
    [task] = resources("service.yaml", "AWS::ECS::TaskDefinition").values()
    [container] = task["Properties"]["ContainerDefinitions"]
    entries = [e["If"][1] if "If" in e else e for e in container["Environment"]]
    [template_entry] = [e for e in entries if e["Name"] == "BRANCHBUILD_PULL_REQUEST_ROLE_TEMPLATE"]
    rendered = template_entry["Value"]["Sub"].replace("${AWS::Partition}", "aws")
    rendered = rendered.replace("${PullRequestRoleName}", "branchbuild-pull-requests")
    settings = Settings(
        queue_url="q",
        work_queue_url="w",
        bucket="bucket",
        pull_request_role_template=rendered,
        allowed_accounts=("210987654321",),
    )
    assert settings.pull_request_role_template.format(account="210987654321") == (
        "arn:aws:iam::210987654321:role/branchbuild-pull-requests"
    )


def test_pipeline_bucket_is_private_and_cleans_up_uploads() -> None:
    [bucket] = resources("pipeline.yaml", "AWS::S3::Bucket").values()
    props = bucket["Properties"]
    assert all(props["PublicAccessBlockConfiguration"].values())
    rules = props["LifecycleConfiguration"]["Rules"]
    assert any("AbortIncompleteMultipartUpload" in rule for rule in rules)
    [policy] = resources("pipeline.yaml", "AWS::S3::BucketPolicy").values()
    text = str(policy)
    assert "aws:SecureTransport" in text and "Deny" in text


def test_service_task_definition_matches_the_service() -> None:
    [task] = resources("service.yaml", "AWS::ECS::TaskDefinition").values()
    [container] = task["Properties"]["ContainerDefinitions"]
    assert container["StopTimeout"] == 120
    assert container["Command"] == ["branchbuild", "run"]
    assert container["HealthCheck"]["Command"] == ["CMD", "branchbuild", "healthcheck"]
    assert container["ReadonlyRootFilesystem"] is True
    secrets = {s["Name"] for s in container["Secrets"]}
    assert secrets == {
        "BRANCHBUILD_SSH_PRIVATE_KEY",
        "BRANCHBUILD_SSH_KEY_ID",
        "BRANCHBUILD_KNOWN_HOSTS",
    }
    # Conditional entries are {If: [condition, entry, NoValue]}.
    entries = [e["If"][1] if "If" in e else e for e in container["Environment"]]
    names = {e["Name"] for e in entries} | secrets
    fields = {f"BRANCHBUILD_{name.upper()}" for name in Settings.model_fields}
    assert {n for n in names if n.startswith("BRANCHBUILD_")} <= fields
    assert not any("PRIVATE_KEY" in e["Name"] for e in entries)
    # The grace period must end before ECS's SIGKILL.
    grace = template("service.yaml")["Parameters"]["ShutdownGrace"]
    assert grace["MaxValue"] < container["StopTimeout"]


def test_service_scales_on_backlog_per_task() -> None:
    [policy] = resources("service.yaml", "AWS::ApplicationAutoScaling::ScalingPolicy").values()
    props = policy["Properties"]
    assert props["PolicyType"] == "TargetTrackingScaling"
    metrics = str(
        props["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"]
    )
    assert metrics.count("ApproximateNumberOfMessagesVisible") == 2
    assert "RunningTaskCount" in metrics
    [service] = resources("service.yaml", "AWS::ECS::Service").values()
    breaker = service["Properties"]["DeploymentConfiguration"]["DeploymentCircuitBreaker"]
    assert breaker == {"Enable": True, "Rollback": True}


def dockerfile_instructions() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found.setdefault(word.upper(), []).append(rest.strip())
    return found


def test_dockerfile_runs_the_real_commands() -> None:
    d = dockerfile_instructions()
    # Every stage on one base (the venv's interpreter links), Python 3.11 on bookworm unless
    # the build says otherwise (`make image` passes one made from Debian's packages).
    assert d["FROM"] == [
        "${BASE_IMAGE} AS requirements",
        "${BASE_IMAGE} AS builder",
        "${BASE_IMAGE}",
    ]
    assert "BASE_IMAGE=python:3.11-slim-bookworm" in d["ARG"]
    assert d["CMD"] == ['["branchbuild", "run"]']
    assert d["ENTRYPOINT"] == ['["/usr/bin/tini", "--"]']
    assert d["STOPSIGNAL"] == ["SIGTERM"]
    assert d["HEALTHCHECK"][0].endswith('CMD ["branchbuild", "healthcheck"]')
    assert d["USER"] == ["10001:10001"]
    assert not any(re.search(r"KEY|SECRET|TOKEN", arg) for arg in d.get("ARG", []))
    # The console script exists and both commands parse.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["branchbuild"] == "service.cli:main"
    for command in ("run", "healthcheck"):
        try:
            cli_main([command, "--help"])
        except SystemExit as exc:
            assert exc.code == 0
    # The health check reaches the port the service listens on in the image.
    env = " ".join(d["ENV"])
    assert "BRANCHBUILD_HTTP_PORT=8080" in env and "8080" in d["EXPOSE"][0]


def test_healthcheck_command_fails_when_nothing_listens() -> None:
    assert cli_main(["healthcheck", "--port", "9", "--timeout", "1"]) == 1


def test_alerts_and_dashboard_use_metrics_the_service_exposes() -> None:
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    metrics = Metrics()
    exposed = generate_latest(metrics.registry).decode()
    families = set(re.findall(r"^# TYPE (\w+) (\w+)", exposed, re.M))
    names = set()
    for family, kind in families:
        names |= {family, f"{family}_total"} if kind == "counter" else {family}
        if kind == "histogram":
            names |= {f"{family}_bucket", f"{family}_count", f"{family}_sum"}
    monitoring = DEPLOY / "monitoring"
    used = set()
    for path in [*monitoring.glob("*.yml"), monitoring / "dashboard.json"]:
        used |= set(re.findall(r"\bbranchbuild_[a-z_]+", path.read_text()))
    assert used, "no branchbuild metric referenced"
    assert used <= names, sorted(used - names)
