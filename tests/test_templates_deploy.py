"""Every template deployed into moto's CloudFormation (over HTTP), in the order
docs/deploying.md gives (the projects before the service, its first consumer), wiring itself
through exports: nothing is copied between stacks.

moto creates the VPC, subnets, security groups, queues, bucket, rules, roles, managed policy,
log groups and the ECS cluster, task definition and service; it accepts but does not create
VPC endpoints, queue and bucket policies, alarms, CodeBuild projects and scaling (README.md
lists what no emulator checks). deploy/pipeline.yaml is also deployed into LocalStack by
tests/test_localstack.py, where a push goes through it to a build.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import requests

from tests.cfn import DEPLOY, Stack

# moto's Fn::GetAZs "" answers us-east-1's zones wherever the stack is.
REGION = "us-east-1"
ACCOUNT = "123456789012"
SECRET = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:branchbuild/ssh-AbCdEf"
KEY = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/k-1"


@pytest.fixture
def moto(moto_endpoint: str) -> Iterator[str]:
    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    yield moto_endpoint


def client(endpoint: str, service: str) -> Any:
    return boto3.client(service, endpoint_url=endpoint, region_name=REGION)


def deploy(endpoint: str, stack: str, template: str, **parameters: str) -> dict[str, str]:
    """create_stack (moto returns no outputs after change sets); the stack's outputs."""
    cf = client(endpoint, "cloudformation")
    cf.create_stack(
        StackName=stack,
        TemplateBody=(DEPLOY / template).read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        Capabilities=["CAPABILITY_NAMED_IAM"],
    )
    deadline = time.monotonic() + 60
    while True:
        [found] = cf.describe_stacks(StackName=stack)["Stacks"]
        if not found["StackStatus"].endswith("_IN_PROGRESS") or time.monotonic() > deadline:
            break
    assert found["StackStatus"] == "CREATE_COMPLETE", (stack, found.get("StackStatusReason"))
    return {o["OutputKey"]: o["OutputValue"] for o in found.get("Outputs", [])}


@pytest.mark.filterwarnings("ignore::UserWarning")  # moto: "no CloudFormation support for ..."
def test_the_stacks_wire_themselves_through_exports(moto: str) -> None:
    network = deploy(moto, "branchbuild-network", "network.yaml")
    pipeline = deploy(
        moto,
        "branchbuild-pipeline",
        "pipeline.yaml",
        RepositoryArns=f"arn:aws:codecommit:{REGION}:{ACCOUNT}:app",
        WorkVisibilityTimeout="300",
        IntakeVisibilityTimeout="7",
    )
    project = deploy(
        moto,
        "branchbuild-project-app",
        "codebuild-project.yaml",
        RepositoryName="app",
        ProjectNamePrefix="bb-",
    )
    # moto keeps AWS::NoValue in a managed policy's statement list (AWS drops it), so the
    # service stack is deployed with a KMS key, which fills that slot.
    service = deploy(
        moto,
        "branchbuild-service",
        "service.yaml",
        Image=f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/branchbuild:1",
        NetworkStackName="branchbuild-network",
        SshSecretArn=SECRET,
        KmsKeyArn=KEY,
        CodeBuildProjectNamePrefix="bb-",
        RepositoryAccountIds=f"{ACCOUNT},222222222222",
        PullRequestRoleName="branchbuild-pull-requests",
        PipelineConfig="s3://branchbuild-config/branchbuild/pipelines.yaml",
    )

    exports = {
        e["Name"]: e["Value"] for e in client(moto, "cloudformation").list_exports()["Exports"]
    }
    for name in (
        "IntakeQueueArn",
        "WorkQueueUrl",
        "BucketName",
        "WorkVisibilityTimeout",
        "IntakeVisibilityTimeout",
    ):
        assert exports[f"branchbuild-pipeline-{name}"] == pipeline[name]
    assert exports["branchbuild-network-PrivateSubnetIds"] == network["PrivateSubnetIds"]

    # The work queue and the service take their visibility timeout from the same parameter.
    sqs = client(moto, "sqs")
    attributes = sqs.get_queue_attributes(
        QueueUrl=pipeline["WorkQueueUrl"], AttributeNames=["VisibilityTimeout"]
    )["Attributes"]
    assert attributes["VisibilityTimeout"] == "300"
    attributes = sqs.get_queue_attributes(
        QueueUrl=pipeline["IntakeQueueUrl"], AttributeNames=["VisibilityTimeout"]
    )["Attributes"]
    assert attributes["VisibilityTimeout"] == "7"
    ecs = client(moto, "ecs")
    [arn] = ecs.list_task_definitions(familyPrefix="branchbuild")["taskDefinitionArns"]
    [container] = ecs.describe_task_definition(taskDefinition=arn)["taskDefinition"][
        "containerDefinitions"
    ]
    # (moto also keeps the AWS::NoValue entries of a list, as None.)
    env = {e["name"]: e["value"] for e in container["environment"] if e}
    assert env["BRANCHBUILD_VISIBILITY_TIMEOUT"] == "300"
    assert env["BRANCHBUILD_INTAKE_VISIBILITY_TIMEOUT"] == "7"
    assert env["BRANCHBUILD_QUEUE_URL"] == pipeline["IntakeQueueUrl"]
    assert env["BRANCHBUILD_WORK_QUEUE_URL"] == pipeline["WorkQueueUrl"]
    assert env["BRANCHBUILD_BUCKET"] == pipeline["BucketName"]
    assert env["BRANCHBUILD_PROJECT_PREFIX"] == "bb-"
    assert env["BRANCHBUILD_ALLOWED_ACCOUNTS"] == f"{ACCOUNT},222222222222"
    assert env["BRANCHBUILD_CONFIG"] == "s3://branchbuild-config/branchbuild/pipelines.yaml"
    secrets = {s["name"]: s["valueFrom"] for s in container["secrets"]}
    assert secrets["BRANCHBUILD_KNOWN_HOSTS"] == f"{SECRET}:known_hosts::"

    # The ECS service exists (moto's CloudFormation drops its launch type and network
    # configuration: which subnets it imports is checked by test_service_imports_the_network
    # below); the network stack's subnets and task security group are real (moto does not
    # record the group's rules).
    [described] = ecs.describe_services(
        cluster=service["ClusterName"], services=[service["ServiceName"]]
    )["services"]
    assert described["status"] == "ACTIVE"
    assert described["taskDefinition"] == arn
    ec2 = client(moto, "ec2")
    subnets = ec2.describe_subnets(SubnetIds=network["PrivateSubnetIds"].split(","))["Subnets"]
    assert {s["VpcId"] for s in subnets} == {network["VpcId"]}
    assert not any(s["MapPublicIpOnLaunch"] for s in subnets)
    [group] = ec2.describe_security_groups(GroupIds=[network["TaskSecurityGroupId"]])[
        "SecurityGroups"
    ]
    assert group["VpcId"] == network["VpcId"]

    # The roles hold the imported names, not placeholders.
    iam = client(moto, "iam")
    task_role = service["TaskRoleArn"].rsplit("/", 1)[-1]
    [name] = iam.list_role_policies(RoleName=task_role)["PolicyNames"]
    document = json.dumps(iam.get_role_policy(RoleName=task_role, PolicyName=name))
    assert pipeline["WorkQueueArn"] in document and pipeline["BucketName"] in document
    assert "s3:ListBucketMultipartUploads" in document
    assert "project/bb-*" in document and "arn:aws:s3:::branchbuild-config/" in document
    assert service["TaskRoleArn"].split(":role", 1)[1].startswith("/branchbuild/task/")
    operator = iam.get_policy(PolicyArn=service["OperatorPolicyArn"])["Policy"]
    assert operator["PolicyName"] == "branchbuild-operator"
    role = project["ServiceRoleArn"].rsplit("/", 1)[-1]
    [name] = iam.list_role_policies(RoleName=role)["PolicyNames"]
    document = json.dumps(iam.get_role_policy(RoleName=role, PolicyName=name))
    assert f"arn:aws:s3:::{pipeline['BucketName']}/app/*" in document
    assert project["OutputPrefix"] == f"s3://{pipeline['BucketName']}/app/"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_account_templates_deploy(moto: str) -> None:
    repositories = f"arn:aws:codecommit:{REGION}:{ACCOUNT}:app"
    reader = deploy(moto, "git-reader", "git-reader.yaml", RepositoryArns=repositories)
    assert client(moto, "iam").get_user(UserName=reader["UserName"])
    bus = deploy(
        moto, "bus", "multi-account/pipeline-account.yaml", SourceAccountIds="222222222222"
    )
    forward = deploy(
        moto,
        "forward",
        "multi-account/repository-account.yaml",
        PipelineEventBusArn=bus["PipelineEventBusArn"],
        RepositoryArns=repositories,
        ServiceAccountId="111111111111",
    )
    # The feedback role trusts the service account's roles under the task role's path.
    iam = client(moto, "iam")
    role = iam.get_role(RoleName="branchbuild-pull-requests")["Role"]
    [statement] = role["AssumeRolePolicyDocument"]["Statement"]
    assert statement["Principal"] == {"AWS": "arn:aws:iam::111111111111:root"}
    assert statement["Condition"] == {
        "ArnLike": {"aws:PrincipalArn": "arn:aws:iam::111111111111:role/branchbuild/task/*"}
    }
    [rule] = client(moto, "events").list_targets_by_rule(Rule="branchbuild-codecommit-forward")[
        "Targets"
    ]
    assert rule["Arn"] == bus["PipelineEventBusArn"]
    assert forward["RuleArn"].endswith("rule/branchbuild-codecommit-forward")


def test_service_imports_the_network_or_takes_given_subnets() -> None:
    """What moto drops: the ECS service's subnets and security groups, resolved as
    CloudFormation resolves them (tests/cfn.py)."""
    network = Stack("branchbuild-network", "network.yaml", region=REGION)
    pipeline = Stack(
        "branchbuild-pipeline",
        "pipeline.yaml",
        {"RepositoryArns": f"arn:aws:codecommit:{REGION}:{ACCOUNT}:app"},
        region=REGION,
    )
    base = {"Image": "image", "SshSecretArn": SECRET, "CodeBuildProjectNamePrefix": "bb-"}
    for parameters, subnets, groups in (
        (
            {"NetworkStackName": "branchbuild-network"},
            [network.ref("PrivateSubnetA"), network.ref("PrivateSubnetB")],
            [network.ref("TaskSecurityGroup")],
        ),
        (
            {"SubnetIds": "subnet-1,subnet-2", "SecurityGroupIds": "sg-1"},
            ["subnet-1", "subnet-2"],
            ["sg-1"],
        ),
    ):
        service = Stack(
            "branchbuild-service",
            "service.yaml",
            base | parameters,
            region=REGION,
            imports=network.exports() | pipeline.exports(),
        )
        vpc = service.properties("Service")["NetworkConfiguration"]["AwsvpcConfiguration"]
        assert (vpc["Subnets"], vpc["SecurityGroups"]) == (subnets, groups)


def test_the_network_has_an_endpoint_for_every_service_the_tasks_call() -> None:
    """Without NAT, a service with no endpoint is unreachable: every service the task and
    execution roles are granted (pull request feedback and cross-account roles included)."""
    network = Stack("branchbuild-network", "network.yaml", region=REGION)
    endpoints = {
        network.properties(e)["ServiceName"].removeprefix(f"com.amazonaws.{REGION}.")
        for e in network.of_type("AWS::EC2::VPCEndpoint")
    }
    pipeline = Stack(
        "branchbuild-pipeline",
        "pipeline.yaml",
        {"RepositoryArns": f"arn:aws:codecommit:{REGION}:{ACCOUNT}:app"},
        region=REGION,
    )
    service = Stack(
        "branchbuild-service",
        "service.yaml",
        {
            "Image": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/branchbuild:1",
            "EcrRepositoryArn": f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/branchbuild",
            "NetworkStackName": "branchbuild-network",
            "SshSecretArn": SECRET,
            "CodeBuildProjectNamePrefix": "bb-",
            "PullRequestRepositoryArns": f"arn:aws:codecommit:{REGION}:{ACCOUNT}:app",
            "PullRequestRoleName": "branchbuild-pull-requests",
            "RepositoryAccountIds": "222222222222",
            # Every optional feature that adds a grant: notifications (SNS) and the keys.
            "NotifyTopicArns": f"arn:aws:sns:{REGION}:{ACCOUNT}:branchbuild-builds",
            "NotifyKmsKeyArn": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/notify",
            "KmsKeyArn": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/pipeline",
            "SecretKmsKeyArn": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/secret",
        },
        region=REGION,
        imports=network.exports() | pipeline.exports(),
    )
    called = set()
    for role in ("TaskRole", "ExecutionRole"):
        for policy in service.properties(role)["Policies"]:
            for statement in policy["PolicyDocument"]["Statement"]:
                if statement["Effect"] == "Allow":
                    actions = statement["Action"]
                    for action in [actions] if isinstance(actions, str) else actions:
                        if action.startswith("kms:"):
                            # Never called by the task: SQS, S3, SNS or Secrets Manager call
                            # KMS on its behalf, over their own endpoints.
                            assert "kms:ViaService" in statement["Condition"]["StringEquals"]
                            continue
                        called.add(action.split(":")[0])
    # ECR is two endpoints; git fetches go to git-codecommit over SSH.
    needed = (called - {"ecr"}) | {"ecr.api", "ecr.dkr", "git-codecommit"}
    assert {"codecommit", "sts", "sns"} <= needed
    assert needed <= endpoints, needed - endpoints
