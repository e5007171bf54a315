"""Read a ``buildspec.yml`` into a typed plan, as the CodeBuild buildspec reference defines it.

Every command is the text the file holds: the YAML is composed into nodes and never
constructed, so ``- false`` stays ``false`` and ``- 1.10`` stays ``1.10`` (YAML 1.1 would make
them a boolean and the float 1.1). Every problem names its line; unknown keys are warnings
(CodeBuild adds keys over time), wrong shapes are errors. ``check`` never raises: the local
backend and ``python -m localdev buildspec check`` share it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import yaml

from service.errors import PermanentError

PHASES = ("install", "pre_build", "build", "post_build")
SHELLS = ("bash", "/bin/sh", "sh")
Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a buildspec; ``line`` is 1-based, None for the whole file."""

    line: int | None
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "file"
        return f"{where}: {self.severity}: {self.message}"


@dataclass(frozen=True)
class Command:
    text: str
    line: int


@dataclass(frozen=True)
class Phase:
    name: str
    commands: tuple[Command, ...] = ()
    finally_: tuple[Command, ...] = ()
    run_as: str | None = None
    on_failure: Literal["ABORT", "CONTINUE"] | None = None
    runtime_versions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Variable:
    """A variable and where it comes from: ``env.variables``, ``parameter-store`` (a parameter
    name) or ``secrets-manager`` (a ``secret-id:json-key:version-stage:version-id`` reference)."""

    name: str
    value: str
    source: Literal["variables", "parameter-store", "secrets-manager"]
    line: int


@dataclass(frozen=True)
class SecretRef:
    """``secret-id:json-key:version-stage:version-id``; every part but the id may be empty."""

    secret_id: str
    json_key: str = ""
    version_stage: str = ""
    version_id: str = ""


@dataclass(frozen=True)
class FileSet:
    """An artifact set (``id`` None for the primary one) or a report group (``id`` its name)."""

    id: str | None
    files: tuple[str, ...]
    base_directory: str = ""
    discard_paths: bool = False
    name: str = ""
    exclude_paths: tuple[str, ...] = ()
    file_format: str = ""


@dataclass(frozen=True)
class Cache:
    paths: tuple[str, ...] = ()
    key: str = ""
    action: Literal["restore", "save", ""] = ""


@dataclass(frozen=True)
class Plan:
    """What a buildspec asks for, checked; ``problems`` holds its warnings."""

    version: str
    shell: str = "/bin/sh"
    run_as: str | None = None
    variables: tuple[Variable, ...] = ()
    exported: tuple[str, ...] = ()
    phases: tuple[Phase, ...] = ()
    artifacts: tuple[FileSet, ...] = ()
    reports: tuple[FileSet, ...] = ()
    cache: Cache = field(default_factory=Cache)
    batch: str | None = None
    problems: tuple[Problem, ...] = ()

    @property
    def one_shell(self) -> bool:
        """0.2 keeps the working directory and variables from command to command; 0.1 not."""
        return self.version != "0.1"


def parse_secret_ref(reference: str) -> SecretRef:
    """Split a secrets-manager reference; an ARN's own colons belong to the id."""
    if reference.startswith("arn:"):
        parts = reference.split(":")
        secret_id, rest = ":".join(parts[:7]), parts[7:]
    else:
        secret_id, _, tail = reference.partition(":")
        rest = tail.split(":") if tail else []
    rest += [""] * (3 - len(rest))
    return SecretRef(secret_id, rest[0], rest[1], ":".join(rest[2:]))


# -- the checker ------------------------------------------------------------------------------

TOP_KEYS = ("version", "run-as", "env", "proxy", "batch", "phases", "reports", "artifacts", "cache")
ENV_KEYS = (
    "shell",
    "variables",
    "parameter-store",
    "exported-variables",
    "secrets-manager",
    "git-credential-helper",
)
PHASE_KEYS = ("run-as", "on-failure", "runtime-versions", "commands", "finally")
ARTIFACT_KEYS = (
    "files",
    "name",
    "discard-paths",
    "base-directory",
    "exclude-paths",
    "enable-symlinks",
    "s3-prefix",
    "secondary-artifacts",
)
REPORT_KEYS = ("files", "base-directory", "discard-paths", "file-format")
REPORT_FORMATS = (
    "CUCUMBERJSON",
    "JUNITXML",
    "NUNITXML",
    "NUNIT3XML",
    "TESTNGXML",
    "VISUALSTUDIOTRX",
    "CLOVERXML",
    "COBERTURAXML",
    "JACOCOXML",
    "SIMPLECOV",
)
CACHE_KEYS = ("paths", "key", "fallback-keys", "action")
BATCH_KEYS = ("fast-fail", "build-list", "build-matrix", "build-graph")
TRUE = ("yes", "true", "on", "y")
FALSE = ("no", "false", "off", "n")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ONLY_ON_CODEBUILD = "runs only on CodeBuild; ignored locally"


class _Checker:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def error(self, node: yaml.Node | None, message: str) -> None:
        self.problems.append(Problem(_line(node), message))

    def warn(self, node: yaml.Node | None, message: str) -> None:
        self.problems.append(Problem(_line(node), message, "warning"))

    def mapping(
        self, node: yaml.Node, what: str, known: tuple[str, ...] | None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """A mapping's entries by key (merge keys applied); unknown keys warned about."""
        if _is_null(node):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what} must be a mapping, not {_kind(node)}")
            return {}
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in self._pairs(node):
            if not isinstance(key, yaml.ScalarNode):
                self.error(key, f"{what}: a key must be text, not {_kind(key)}")
                continue
            if key.value in entries:
                first = _line(entries[key.value][0])
                self.error(key, f"{what}: duplicate key {key.value!r} (first on line {first})")
                continue
            if known is not None and key.value not in known:
                hint = difflib.get_close_matches(key.value, known, n=1)
                self.warn(
                    key,
                    f"{what}: unknown key {key.value!r}, ignored"
                    + (f" (did you mean {hint[0]!r}?)" if hint else ""),
                )
                continue
            entries[key.value] = (key, value)
        return entries

    def _pairs(self, node: yaml.MappingNode) -> Iterator[tuple[yaml.Node, yaml.Node]]:
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        own: list[tuple[yaml.Node, yaml.Node]] = []
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":
                sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
                for source in sources:
                    if isinstance(source, yaml.MappingNode):
                        merged += list(self._pairs(source))
                    else:
                        self.error(source, "a merge key (<<) must name a mapping")
            else:
                own.append((key, value))
        keys = {k.value for k, _ in own if isinstance(k, yaml.ScalarNode)}
        yield from own
        yield from (
            (k, v) for k, v in merged if not (isinstance(k, yaml.ScalarNode) and k.value in keys)
        )

    def text(self, node: yaml.Node, what: str) -> str | None:
        if isinstance(node, yaml.ScalarNode):
            return str(node.value)
        self.error(node, f"{what} must be text, not {_kind(node)}")
        return None

    def texts(self, node: yaml.Node, what: str) -> list[tuple[str, int]]:
        """A list of strings (a single string is taken as a list of one, as CodeBuild does)."""
        if _is_null(node):
            return []
        if isinstance(node, yaml.ScalarNode):
            return [(str(node.value), _line(node) or 0)]
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"{what} must be a list, not {_kind(node)}")
            return []
        out = []
        for item in node.value:
            if _is_null(item):
                self.warn(item, f"{what}: an empty item, ignored")
            elif isinstance(item, yaml.ScalarNode):
                out.append((str(item.value), _line(item) or 0))
            else:
                self.error(
                    item,
                    f"{what}: each item must be text, not {_kind(item)}"
                    + (
                        " (quote a command holding ': ')"
                        if isinstance(item, yaml.MappingNode)
                        else ""
                    ),
                )
        return out

    def flag(self, node: yaml.Node, what: str) -> bool:
        value = self.text(node, what)
        if value is None:
            return False
        if value.lower() in TRUE:
            return True
        if value.lower() not in FALSE:
            self.error(node, f"{what} must be yes or no, not {value!r}")
        return False

    def choice(self, node: yaml.Node, what: str, choices: tuple[str, ...]) -> str | None:
        value = self.text(node, what)
        if value is not None and value not in choices:
            self.error(node, f"{what} must be one of {', '.join(choices)}, not {value!r}")
            return None
        return value

    # -- sections --

    def plan(self, root: yaml.Node) -> Plan | None:
        top = self.mapping(root, "the buildspec", TOP_KEYS)
        if "version" not in top:
            self.error(root, "no version: the first line should be 'version: 0.2'")
            return None
        version = self.text(top["version"][1], "version")
        if version not in ("0.1", "0.2"):
            if version is not None:
                self.error(top["version"][1], f"version must be 0.2 or 0.1, not {version!r}")
            return None
        plan = Plan(version=version)
        if "run-as" in top:
            plan = _replace(plan, run_as=self.text(top["run-as"][1], "run-as"))
        if "env" in top:
            plan = self.env(plan, top["env"][1])
        if "proxy" in top:
            self.mapping(top["proxy"][1], "proxy", ("upload-artifacts", "logs"))
            self.warn(top["proxy"][0], f"proxy {ONLY_ON_CODEBUILD}")
        if "batch" in top:
            plan = _replace(plan, batch=self.batch(top["batch"][0], top["batch"][1]))
        if "phases" in top:
            plan = _replace(plan, phases=self.phases(top["phases"][1], plan.version))
        if not plan.phases and not any(p.severity == "error" for p in self.problems):
            where = top["phases"][1] if "phases" in top else root
            why = (
                " (a batch section alone needs StartBuildBatch; branchbuild starts single builds)"
                if "batch" in top
                else ""
            )
            self.error(
                where, "no phases: a buildspec needs at least one of " + ", ".join(PHASES) + why
            )
        return self.outputs(plan, top)

    def outputs(self, plan: Plan, top: dict[str, tuple[yaml.Node, yaml.Node]]) -> Plan:
        if "artifacts" in top:
            plan = _replace(plan, artifacts=self.artifacts(top["artifacts"][1]))
        if "reports" in top:
            plan = _replace(plan, reports=self.reports(top["reports"][1]))
        if "cache" in top:
            plan = _replace(plan, cache=self.cache(top["cache"][1]))
        return plan

    def env(self, plan: Plan, node: yaml.Node) -> Plan:
        env = self.mapping(node, "env", ENV_KEYS)
        if "shell" in env:
            shell = self.choice(env["shell"][1], "env.shell", SHELLS)
            if shell is not None:
                plan = _replace(plan, shell="/bin/sh" if shell == "sh" else shell)
        variables: list[Variable] = []
        for section in ("variables", "parameter-store", "secrets-manager"):
            if section in env:
                variables += self.variables(env[section][1], section)
        if "exported-variables" in env:
            exported = self.texts(env["exported-variables"][1], "env.exported-variables")
            for name, line in exported:
                if not NAME.match(name):
                    self.problems.append(Problem(line, f"{name!r} is not a variable name"))
            plan = _replace(plan, exported=tuple(n for n, _ in exported if NAME.match(n)))
        if "git-credential-helper" in env:
            if self.flag(env["git-credential-helper"][1], "env.git-credential-helper"):
                self.warn(
                    env["git-credential-helper"][0],
                    "env.git-credential-helper: yes "
                    + ONLY_ON_CODEBUILD
                    + " (git uses this machine's credentials)",
                )
        return _replace(plan, variables=tuple(variables))

    def variables(self, node: yaml.Node, section: str) -> list[Variable]:
        variables = []
        for key, (_, value) in self.mapping(node, f"env.{section}", None).items():
            if not NAME.match(key):
                self.error(value, f"env.{section}: {key!r} is not a variable name")
                continue
            text = "" if _is_null(value) else self.text(value, f"env.{section}.{key}")
            if text is None:
                continue
            if section != "variables" and not text:
                self.error(value, f"env.{section}.{key} names no {section} entry")
                continue
            if section == "secrets-manager" and not parse_secret_ref(text).secret_id:
                self.error(value, f"env.secrets-manager.{key}: no secret id in {text!r}")
                continue
            line = _line(value) or 0
            variables.append(Variable(key, text, section, line))  # type: ignore[arg-type]
        return variables

    def batch(self, key: yaml.Node, node: yaml.Node) -> str | None:
        batch = self.mapping(node, "batch", BATCH_KEYS)
        kinds = [k for k in ("build-list", "build-matrix", "build-graph") if k in batch]
        if len(kinds) > 1:
            self.error(key, f"batch: only one of build-list, build-matrix, build-graph ({kinds})")
        for kind in kinds:
            value = batch[kind][1]
            expected = yaml.MappingNode if kind == "build-matrix" else yaml.SequenceNode
            if not isinstance(value, expected):
                self.error(value, f"batch.{kind} must be a {_name(expected)}, not {_kind(value)}")
        if "fast-fail" in batch:
            self.flag(batch["fast-fail"][1], "batch.fast-fail")
        self.warn(
            key,
            "batch: branchbuild starts single builds (StartBuild), for which CodeBuild ignores "
            "the batch section; the phases run once, locally as on CodeBuild",
        )
        return kinds[0] if kinds else None

    def phases(self, node: yaml.Node, version: str) -> tuple[Phase, ...]:
        phases = []
        for name, (key, value) in self.mapping(node, "phases", PHASES).items():
            phase = self.mapping(value, f"phases.{name}", PHASE_KEYS)
            commands = (
                tuple(
                    Command(text, line)
                    for text, line in self.texts(phase["commands"][1], f"phases.{name}.commands")
                )
                if "commands" in phase
                else ()
            )
            finally_ = (
                tuple(
                    Command(text, line)
                    for text, line in self.texts(phase["finally"][1], f"phases.{name}.finally")
                )
                if "finally" in phase
                else ()
            )
            if "finally" in phase and version == "0.1":
                self.warn(phase["finally"][0], "finally needs version 0.2; run anyway")
            if not commands and "commands" not in phase and phase:
                self.warn(key, f"phases.{name} has no commands")
            on_failure = None
            if "on-failure" in phase:
                on_failure = self.choice(
                    phase["on-failure"][1], f"phases.{name}.on-failure", ("ABORT", "CONTINUE")
                )
            runtimes: list[tuple[str, str]] = []
            if "runtime-versions" in phase:
                if name != "install":
                    self.warn(phase["runtime-versions"][0], "runtime-versions belongs to install")
                rv = self.mapping(phase["runtime-versions"][1], "runtime-versions", None)
                for runtime, (_, version_node) in rv.items():
                    runtimes.append((runtime, self.text(version_node, runtime) or ""))
                self.warn(
                    phase["runtime-versions"][0],
                    "runtime-versions "
                    + ONLY_ON_CODEBUILD
                    + " (the tools on this machine's PATH are used): "
                    + ", ".join(f"{r} {v}" for r, v in runtimes),
                )
            run_as = self.text(phase["run-as"][1], "run-as") if "run-as" in phase else None
            phases.append(
                Phase(
                    name=name,
                    commands=commands,
                    finally_=finally_,
                    run_as=run_as,
                    on_failure=on_failure,  # type: ignore[arg-type]
                    runtime_versions=tuple(runtimes),
                )
            )
        phases.sort(key=lambda p: PHASES.index(p.name))
        return tuple(phases)

    def file_set(self, node: yaml.Node, what: str, id_: str | None, report: bool) -> FileSet:
        keys = (
            REPORT_KEYS
            if report
            else tuple(k for k in ARTIFACT_KEYS if id_ is None or k != "secondary-artifacts")
        )
        entries = self.mapping(node, what, keys)
        files = (
            [f for f, _ in self.texts(entries["files"][1], f"{what}.files")]
            if "files" in entries
            else []
        )
        for f in files:
            if f.startswith("/") or ".." in f.split("/"):
                self.error(entries["files"][1], f"{what}.files: {f!r} must stay inside the source")
        base = (
            self.text(entries["base-directory"][1], f"{what}.base-directory")
            if "base-directory" in entries
            else ""
        )
        if base and (base.startswith("/") or ".." in base.split("/")):
            self.error(
                entries["base-directory"][1], f"{what}.base-directory must stay inside the source"
            )
        discard = (
            self.flag(entries["discard-paths"][1], f"{what}.discard-paths")
            if "discard-paths" in entries
            else False
        )
        file_format = ""
        if report and "file-format" in entries:
            file_format = (
                self.choice(entries["file-format"][1], f"{what}.file-format", REPORT_FORMATS) or ""
            )
        name = self.text(entries["name"][1], f"{what}.name") or "" if "name" in entries else ""
        excluded = (
            tuple(f for f, _ in self.texts(entries["exclude-paths"][1], f"{what}.exclude-paths"))
            if "exclude-paths" in entries
            else ()
        )
        for only in ("s3-prefix", "enable-symlinks"):
            if only in entries:
                self.warn(entries[only][0], f"{what}.{only} {ONLY_ON_CODEBUILD}")
        if not files and not (not report and "secondary-artifacts" in entries):
            self.error(node, f"{what} has no files")
        return FileSet(id_, tuple(files), base or "", discard, name, excluded, file_format)

    def artifacts(self, node: yaml.Node) -> tuple[FileSet, ...]:
        entries = self.mapping(node, "artifacts", ARTIFACT_KEYS)
        sets = []
        if "files" in entries or "secondary-artifacts" not in entries:
            sets.append(self.file_set(node, "artifacts", None, report=False))
        if "secondary-artifacts" in entries:
            secondary = self.mapping(entries["secondary-artifacts"][1], "secondary-artifacts", None)
            for id_, (_, value) in secondary.items():
                if not re.match(r"^[A-Za-z0-9_-]+$", id_):
                    self.error(value, f"secondary-artifacts: {id_!r} is not an artifact identifier")
                    continue
                sets.append(self.file_set(value, f"secondary-artifacts.{id_}", id_, report=False))
        return tuple(sets)

    def reports(self, node: yaml.Node) -> tuple[FileSet, ...]:
        groups = []
        for name, (_, value) in self.mapping(node, "reports", None).items():
            if "/" in name and not name.startswith("arn:"):
                self.error(value, f"reports: {name!r} is not a report group name or ARN")
                continue
            groups.append(self.file_set(value, f"reports.{name}", name, report=True))
        return tuple(groups)

    def cache(self, node: yaml.Node) -> Cache:
        entries = self.mapping(node, "cache", CACHE_KEYS)
        paths = (
            tuple(p for p, _ in self.texts(entries["paths"][1], "cache.paths"))
            if "paths" in entries
            else ()
        )
        if not paths:
            self.warn(node, "cache has no paths: nothing is cached")
        key = self.text(entries["key"][1], "cache.key") or "" if "key" in entries else ""
        if "fallback-keys" in entries:
            self.texts(entries["fallback-keys"][1], "cache.fallback-keys")
            self.warn(
                entries["fallback-keys"][0],
                "cache.fallback-keys: the local cache keeps one entry per key; "
                "fallbacks are not searched",
            )
        action = ""
        if "action" in entries:
            action = self.choice(entries["action"][1], "cache.action", ("restore", "save")) or ""
        return Cache(paths, key, action)  # type: ignore[arg-type]


def _replace(plan: Plan, **changes: object) -> Plan:
    from dataclasses import replace

    return replace(plan, **changes)  # type: ignore[arg-type]


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None and node.start_mark else None


def _is_null(node: yaml.Node) -> bool:
    return (
        isinstance(node, yaml.ScalarNode)
        and node.tag == "tag:yaml.org,2002:null"
        and node.style is None
    )


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"the text {node.value!r}"


def _name(node_type: type[yaml.Node]) -> str:
    return "mapping" if node_type is yaml.MappingNode else "list"


def check(text: str) -> tuple[Plan | None, tuple[Problem, ...]]:
    """The plan (None if the buildspec has errors) and every problem found, sorted by line."""
    if not text.strip():
        return None, (Problem(None, "the buildspec is empty"),)
    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        hint = (
            " (YAML does not allow tabs for indentation)"
            if "\t" in text and "tab" in str(exc).lower() or ("found character '\\t'" in str(exc))
            else ""
        )
        message = f"not valid YAML: {reason}" + (f" ({context})" if context else "") + hint
        return None, (Problem(line, message),)
    except RecursionError:
        return None, (Problem(None, "not valid YAML: nested too deeply"),)
    documents = [d for d in documents if d is not None]
    if not documents:
        return None, (Problem(None, "the buildspec is empty"),)
    checker = _Checker()
    if len(documents) > 1:
        checker.error(documents[1], "more than one YAML document (---): a buildspec is one")
    try:
        plan = checker.plan(documents[0])
    except RecursionError:
        return None, (Problem(None, "the buildspec is nested too deeply"),)
    unique = dict.fromkeys(checker.problems)  # the primary artifacts' keys are read twice
    problems = tuple(sorted(unique, key=lambda p: (p.line or 0, p.severity)))
    if plan is None or any(p.severity == "error" for p in problems):
        return None, problems
    return _replace(plan, problems=problems), problems


class BuildspecError(PermanentError):
    """The buildspec cannot run: missing, not YAML, or with errors (each with its line)."""
