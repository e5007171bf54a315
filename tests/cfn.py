"""CloudFormation templates read as CloudFormation would read them, for the tests.

:func:`load` keeps the short-form tags (``!Ref``, ``!Sub``...) as ``{name: value}`` mappings.
:class:`Stack` resolves a template for a concrete account and region the way CloudFormation
does: parameters (given or default), pseudo parameters, conditions, ``Ref``, ``Fn::GetAtt``
(the attributes the templates use), ``Fn::Sub``, ``Fn::If``, ``Fn::Select``, ``Fn::Split``,
``Fn::Join``, ``Fn::ImportValue`` (from the exports of stacks resolved before it) and
``AWS::NoValue``. Physical names are the ones CloudFormation would give, or
``<stack>-<logical id>`` where it would generate one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


class CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags (!Ref, !Sub, ...) kept as {tag: value}."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {suffix: value}


CfnLoader.add_multi_constructor("!", _tag)


def load(name: str) -> dict[str, Any]:
    """deploy/<name>, with short-form tags as {"Ref": ...}, {"Sub": ...}, ..."""
    data: dict[str, Any] = yaml.load((DEPLOY / name).read_text(), Loader=CfnLoader)  # noqa: S506
    return data


class ParameterRefused(ValueError):
    """CloudFormation refuses the stack: a parameter breaks its constraints."""


def _check_parameter(template: str, key: str, spec: dict[str, Any], value: Any) -> None:
    """The constraints CloudFormation checks before it creates anything."""
    text = str(value)
    problems = []
    if "AllowedPattern" in spec and not re.fullmatch(spec["AllowedPattern"], text):
        problems.append(f"does not match {spec['AllowedPattern']}")
    if "AllowedValues" in spec and text not in [str(v) for v in spec["AllowedValues"]]:
        problems.append(f"is not one of {spec['AllowedValues']}")
    if "MinLength" in spec and len(text) < int(spec["MinLength"]):
        problems.append(f"is shorter than {spec['MinLength']}")
    if problems:
        raise ParameterRefused(f"{template}: {key}={text!r} {' and '.join(problems)}")


class _NoValue:
    """AWS::NoValue: the property or list item is removed."""


NO_VALUE = _NoValue()
_FUNCTIONS = {
    "Ref",
    "Sub",
    "GetAtt",
    "If",
    "Select",
    "Split",
    "Join",
    "ImportValue",
    "Equals",
    "Not",
    "And",
    "Or",
    "Condition",
    "GetAZs",
    "Cidr",
}

# How each resource type the templates use answers Ref and Fn::GetAtt (name, arn).
_SERVICE = {
    "AWS::SQS::Queue": "sqs",
    "AWS::S3::Bucket": "s3",
    "AWS::Events::Rule": "events",
    "AWS::Logs::LogGroup": "logs",
    "AWS::IAM::Role": "iam",
    "AWS::IAM::ManagedPolicy": "iam",
    "AWS::SNS::Topic": "sns",
    "AWS::ECR::Repository": "ecr",
    "AWS::CodeBuild::Project": "codebuild",
    "AWS::ECS::Cluster": "ecs",
    "AWS::ECS::Service": "ecs",
    "AWS::CloudWatch::Alarm": "cloudwatch",
}
_NAME_PROPERTY = {
    "AWS::SQS::Queue": "QueueName",
    "AWS::S3::Bucket": "BucketName",
    "AWS::Events::Rule": "Name",
    "AWS::Logs::LogGroup": "LogGroupName",
    "AWS::IAM::Role": "RoleName",
    "AWS::IAM::ManagedPolicy": "ManagedPolicyName",
    "AWS::SNS::Topic": "TopicName",
    "AWS::ECR::Repository": "RepositoryName",
    "AWS::CodeBuild::Project": "Name",
    "AWS::ECS::Cluster": "ClusterName",
    "AWS::ECS::Service": "ServiceName",
    "AWS::CloudWatch::Alarm": "AlarmName",
}


@dataclass
class Stack:
    """One template resolved for a stack ``name`` in ``account`` and ``region``."""

    name: str
    template_name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    account: str = "123456789012"
    region: str = "eu-west-1"
    imports: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.template = load(self.template_name)
        given = dict(self.parameters)
        self.parameters = {}
        for key, spec in self.template.get("Parameters", {}).items():
            if key in given:
                value = given.pop(key)
            elif "Default" in spec:
                value = spec["Default"]
            else:
                raise KeyError(f"{self.template_name}: parameter {key} has no value")
            if spec["Type"] in ("CommaDelimitedList",) or spec["Type"].startswith("List<"):
                value = value.split(",") if isinstance(value, str) else list(value)
                # A list's AllowedPattern must match each of its values.
                for item in value:
                    _check_parameter(self.template_name, key, spec, item)
            else:
                _check_parameter(self.template_name, key, spec, value)
            self.parameters[key] = value
        if given:
            raise KeyError(f"{self.template_name}: unknown parameters {sorted(given)}")
        self.resources: dict[str, Any] = self.template.get("Resources", {})
        self.conditions = {
            name: bool(self.resolve(expr))
            for name, expr in self.template.get("Conditions", {}).items()
        }

    # -- resources ------------------------------------------------------------------------

    def resource(self, logical: str) -> dict[str, Any]:
        found: dict[str, Any] = self.resources[logical]
        return found

    def properties(self, logical: str) -> dict[str, Any]:
        props: dict[str, Any] = self.resolve(self.resource(logical).get("Properties", {}))
        return props

    def of_type(self, kind: str) -> list[str]:
        return [k for k, v in self.resources.items() if v["Type"] == kind and self.exists(k)]

    def exists(self, logical: str) -> bool:
        condition = self.resource(logical).get("Condition")
        return condition is None or self.conditions[condition]

    def physical_name(self, logical: str) -> str:
        kind = self.resource(logical)["Type"]
        prop = _NAME_PROPERTY.get(kind)
        name = self.resolve(self.resource(logical).get("Properties", {}).get(prop, NO_VALUE))
        if name is NO_VALUE or prop is None:
            name = f"{self.name}-{logical}"
            if kind == "AWS::S3::Bucket":
                name = name.lower()
        return str(name)

    def arn(self, logical: str) -> str:
        kind = self.resource(logical)["Type"]
        name = self.physical_name(logical)
        service = _SERVICE.get(kind, kind.split("::")[1].lower())
        where = f"arn:aws:{service}:{self.region}:{self.account}"
        if kind == "AWS::S3::Bucket":
            return f"arn:aws:s3:::{name}"
        if kind == "AWS::IAM::Role":
            path = self.resolve(self.resource(logical).get("Properties", {}).get("Path", "/"))
            return f"arn:aws:iam::{self.account}:role{path}{name}"
        if kind == "AWS::IAM::ManagedPolicy":
            return f"arn:aws:iam::{self.account}:policy/{name}"
        if kind == "AWS::Events::Rule":
            return f"{where}:rule/{name}"
        if kind == "AWS::Logs::LogGroup":
            return f"{where}:log-group:{name}:*"
        if kind == "AWS::ECR::Repository":
            return f"{where}:repository/{name}"
        if kind == "AWS::CodeBuild::Project":
            return f"{where}:project/{name}"
        return f"{where}:{name}"

    def ref(self, name: str) -> Any:
        pseudo = {
            "AWS::AccountId": self.account,
            "AWS::Region": self.region,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackName": self.name,
            "AWS::NoValue": NO_VALUE,
        }
        if name in pseudo:
            return pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        kind = self.resource(name)["Type"]
        if kind == "AWS::SQS::Queue":
            return (
                f"https://sqs.{self.region}.amazonaws.com/{self.account}/{self.physical_name(name)}"
            )
        if kind in ("AWS::IAM::ManagedPolicy", "AWS::SNS::Topic"):
            return self.arn(name)
        return self.physical_name(name)

    def get_att(self, logical: str, attribute: str) -> str:
        if attribute in ("Arn", "TopicArn"):
            return self.arn(logical)
        if attribute in ("QueueName", "Name"):
            return self.physical_name(logical)
        if attribute == "QueueUrl":
            return str(self.ref(logical))
        if attribute == "RepositoryUri":
            name = self.physical_name(logical)
            return f"{self.account}.dkr.ecr.{self.region}.amazonaws.com/{name}"
        return f"{self.physical_name(logical)}.{attribute}"

    # -- outputs --------------------------------------------------------------------------

    def outputs(self) -> dict[str, Any]:
        return {
            key: self.resolve(spec["Value"])
            for key, spec in self.template.get("Outputs", {}).items()
            if "Condition" not in spec or self.conditions[spec["Condition"]]
        }

    def exports(self) -> dict[str, Any]:
        return {
            self.resolve(spec["Export"]["Name"]): self.resolve(spec["Value"])
            for spec in self.template.get("Outputs", {}).values()
            if "Export" in spec and ("Condition" not in spec or self.conditions[spec["Condition"]])
        }

    # -- intrinsic functions --------------------------------------------------------------

    def resolve(self, node: Any) -> Any:
        if isinstance(node, list):
            items = [self.resolve(item) for item in node]
            return [item for item in items if item is not NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            [(key, value)] = node.items()
            name = key.removeprefix("Fn::")
            if name in _FUNCTIONS and (key.startswith("Fn::") or key in ("Ref", "Condition")):
                return self._function(name, value)
            if name in _FUNCTIONS and key == name:  # a short-form tag
                return self._function(name, value)
        resolved = {key: self.resolve(value) for key, value in node.items()}
        return {key: value for key, value in resolved.items() if value is not NO_VALUE}

    def _function(self, name: str, value: Any) -> Any:  # noqa: C901
        if name == "Ref":
            return self.ref(value)
        if name == "Condition":
            return self.conditions[value]
        if name == "GetAtt":
            logical, attribute = value.split(".", 1) if isinstance(value, str) else value
            return self.get_att(logical, attribute)
        if name == "Sub":
            text, extra = (value, {}) if isinstance(value, str) else value
            return self._sub(text, {k: self.resolve(v) for k, v in extra.items()})
        if name == "If":
            condition, then, otherwise = value
            return self.resolve(then if self.conditions[condition] else otherwise)
        if name == "Equals":
            left, right = (self.resolve(v) for v in value)
            return str(left) == str(right)
        if name == "Not":
            return not self.resolve(value[0])
        if name == "And":
            return all(self.resolve(v) for v in value)
        if name == "Or":
            return any(self.resolve(v) for v in value)
        if name == "Select":
            index, items = value
            return self.resolve(items)[int(self.resolve(index))]
        if name == "Split":
            delimiter, text = value
            return str(self.resolve(text)).split(delimiter)
        if name == "Join":
            delimiter, items = value
            return delimiter.join(str(i) for i in self.resolve(items))
        if name == "ImportValue":
            return self.imports[self.resolve(value)]
        if name == "GetAZs":
            return [f"{self.region}{zone}" for zone in "abc"]
        if name == "Cidr":
            block, count, bits = (self.resolve(v) for v in value)
            return [f"cidr-{i}-of-{block}/{32 - int(bits)}" for i in range(int(count))]
        raise ValueError(f"unsupported function {name}")

    def _sub(self, text: str, extra: dict[str, Any]) -> str:
        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in extra:
                return str(extra[name])
            if "." in name and not name.startswith("AWS::"):
                logical, attribute = name.split(".", 1)
                return self.get_att(logical, attribute)
            return str(self.ref(name))

        return re.sub(r"\$\{([^}]+)\}", one, text)
