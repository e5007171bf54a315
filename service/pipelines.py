"""The pipeline configuration file (``BRANCHBUILD_CONFIG``): rules per repository.

A YAML file, local or ``s3://bucket/key``, holds an ordered list of rules; the first rule
whose ``repository`` globs match a push's repository applies, and every field a rule leaves
out takes the environment's setting (``BRANCHBUILD_*``). Without a file, or for a repository no
rule matches, the environment's settings are the rule.

The file is validated whole with pydantic; an error names the file, the line and the field.
At start-up a bad file refuses to start; while running (:class:`Watcher`), a bad new version
is refused, logged and counted, and the last good one stays in force.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .aws import region, translated
from .errors import BranchbuildError, ConfigurationError, StorageError
from .ledger import KeySpace, may_share_keys
from .settings import Settings, check_key_template, check_notify_on, check_template, check_topics

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

    from .metrics import Metrics

log = logging.getLogger("branchbuild.pipelines")

DEFAULT_SKIP_MARKERS = ("[skip ci]", "[ci skip]", "[skip branchbuild]")
# Set by branchbuild itself: a rule's environment may not override them.
RESERVED_VARIABLES = frozenset({"COMMIT_ID", "BRANCH_NAME", "TAG_NAME", "REPOSITORY_NAME"})
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class SourceMode(StrEnum):
    """How CodeBuild gets the source: our zip in S3, or CodeCommit directly (same account)."""

    ARCHIVE = "archive"
    CODECOMMIT = "codecommit"


class MergeStrategy(StrEnum):
    """How a pull request's merge build merges (CodeCommit's ``mergeOption``)."""

    FAST_FORWARD_MERGE = "FAST_FORWARD_MERGE"
    SQUASH_MERGE = "SQUASH_MERGE"
    THREE_WAY_MERGE = "THREE_WAY_MERGE"


class OnDelete(StrEnum):
    """What happens to a deleted branch's archives and ledger entries."""

    KEEP = "keep"
    DELETE = "delete"


@dataclass(frozen=True)
class Rule:
    """The resolved rule for one repository: every field has its value."""

    name: str
    project_template: str
    include_branches: tuple[str, ...]
    exclude_branches: tuple[str, ...]
    protected_branches: tuple[str, ...]
    build_tags: bool
    include_paths: tuple[str, ...]
    exclude_paths: tuple[str, ...]
    skip_markers: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]
    # None: the environment's default (the build-outcomes work's BRANCHBUILD_KEEP_RUNNING_BRANCHES).
    keep_running_branches: tuple[str, ...] | None
    key_template: str
    source: SourceMode
    on_delete: OnDelete
    # Archive contents (docs/build-contents.md).
    submodules: bool = False
    git_metadata: bool = False
    # Capacity scheduling (service/scheduler.py): higher starts first; at most max_running of
    # this rule's builds running at once (None: no limit of its own).
    priority: int = 0
    max_running: int | None = None
    # Pull requests built as merged (service/mergebuilds.py, docs/merge-builds.md).
    merge_build: bool = False
    merge_strategy: MergeStrategy = MergeStrategy.THREE_WAY_MERGE
    # Notifications (service/notify.py): the SNS topics and the outcomes that notify.
    notify_topics: tuple[str, ...] = ()
    notify_on: tuple[str, ...] = ()
    # CodeBuild's own auto-retry (docs/badges-and-retries.md): autoRetryLimitOverride on
    # StartBuild; None leaves the project's autoRetryLimit as it is.
    retries: int | None = None
    # Capacity scheduling: the priority of the rule's merge builds (pull_requests.priority;
    # None: the rule's priority).
    merge_priority: int | None = None

    @property
    def filters_paths(self) -> bool:
        return bool(self.include_paths or self.exclude_paths)

    @property
    def needs_commit(self) -> bool:
        """Whether deciding needs the commit itself (its message or its changed paths)."""
        return bool(self.skip_markers) or self.filters_paths

    @classmethod
    def from_settings(cls, settings: Settings) -> Rule:
        return cls(
            name="(environment)",
            project_template=settings.project_template,
            include_branches=settings.include_branches,
            exclude_branches=(),
            protected_branches=settings.protected_branches,
            build_tags=settings.build_tags,
            include_paths=(),
            exclude_paths=(),
            skip_markers=DEFAULT_SKIP_MARKERS,
            environment=(),
            keep_running_branches=None,
            key_template=settings.key_template,
            source=SourceMode.ARCHIVE,
            on_delete=OnDelete.KEEP,
            submodules=settings.submodules,
            notify_topics=settings.notify_topics,
            notify_on=settings.notify_on,
        )


# -- the file's schema ------------------------------------------------------------------------

Globs = tuple[Annotated[str, Field(min_length=1)], ...]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Branches(_Model):
    include: Globs | None = None
    exclude: Globs = ()
    protected: Globs | None = None


class _Paths(_Model):
    include: Globs = ()
    exclude: Globs = ()


class _PullRequests(_Model):
    merge_build: bool = False
    merge_strategy: MergeStrategy = MergeStrategy.THREE_WAY_MERGE
    priority: int | None = Field(default=None, ge=-1000, le=1000)


class _Notify(_Model):
    topics: tuple[str, ...] | None = None
    on: tuple[str, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `on:` key as the boolean true (GitHub Actions' `on:` too).
        if isinstance(value, dict) and True in value:
            value = {("on" if k is True else k): v for k, v in value.items()}
        return value

    @field_validator("topics")
    @classmethod
    def _topics(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else check_topics(value)

    @field_validator("on")
    @classmethod
    def _on(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else check_notify_on(value)


class _RuleModel(_Model):
    repository: Annotated[Globs, Field(min_length=1)]
    project: str | None = None
    branches: _Branches = _Branches()
    tags: bool | None = None
    paths: _Paths = _Paths()
    skip_markers: tuple[Annotated[str, Field(min_length=1)], ...] | None = None
    environment: dict[str, str] = {}
    keep_running: Globs | None = None
    key: str | None = None
    source: SourceMode = SourceMode.ARCHIVE
    on_delete: OnDelete = OnDelete.KEEP
    submodules: bool | None = None
    git_metadata: bool = False
    priority: int = Field(default=0, ge=-1000, le=1000)
    max_running: int | None = Field(default=None, ge=1)
    pull_requests: _PullRequests = _PullRequests()
    notify: _Notify = _Notify()
    retries: int | None = Field(default=None, ge=0, le=10)

    @field_validator("repository", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("project")
    @classmethod
    def _project(cls, value: str | None) -> str | None:
        if value is not None:
            check_template(value, {"repository", "branch"}, required=set())
        return value

    @field_validator("key")
    @classmethod
    def _key(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            # (`repository` is validated before `key`: a rule naming one repository exactly
            # needs no {repository} in its key)
            patterns = info.data.get("repository", ())
            one = len(patterns) == 1 and not any(c in patterns[0] for c in "*?[")
            check_key_template(value, one_repository=one)
        return value

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _VARIABLE.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if name in RESERVED_VARIABLES:
                raise ValueError(f"{name} is set by branchbuild and cannot be overridden")
        return value

    @field_validator("pull_requests")
    @classmethod
    def _merge_build(cls, value: _PullRequests, info: ValidationInfo) -> _PullRequests:
        if value.merge_build and info.data.get("source") is SourceMode.CODECOMMIT:
            raise ValueError(
                "merge_build needs source: archive (the merge commit is on no branch, so "
                "branchbuild fetches it by id and uploads it; CodeBuild's own clone would not)"
            )
        return value

    def resolve(self, defaults: Rule, index: int) -> Rule:
        b = self.branches
        return Rule(
            name=f"rules[{index}] ({', '.join(self.repository)})",
            project_template=self.project or defaults.project_template,
            include_branches=b.include if b.include is not None else defaults.include_branches,
            exclude_branches=b.exclude,
            protected_branches=(
                b.protected if b.protected is not None else defaults.protected_branches
            ),
            build_tags=self.tags if self.tags is not None else defaults.build_tags,
            include_paths=self.paths.include,
            exclude_paths=self.paths.exclude,
            skip_markers=(
                self.skip_markers if self.skip_markers is not None else defaults.skip_markers
            ),
            environment=tuple(sorted(self.environment.items())),
            keep_running_branches=self.keep_running,
            key_template=self.key or defaults.key_template,
            source=self.source,
            on_delete=self.on_delete,
            submodules=self.submodules if self.submodules is not None else defaults.submodules,
            git_metadata=self.git_metadata,
            priority=self.priority,
            max_running=self.max_running,
            merge_build=self.pull_requests.merge_build,
            merge_strategy=self.pull_requests.merge_strategy,
            notify_topics=(
                self.notify.topics if self.notify.topics is not None else defaults.notify_topics
            ),
            notify_on=self.notify.on if self.notify.on is not None else defaults.notify_on,
            retries=self.retries,
            merge_priority=self.pull_requests.priority,
        )


class _Reconcile(_Model):
    repositories: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,100}$")], ...] = ()
    # The repositories' account and region (the pushes' own); by default the only entry of
    # BRANCHBUILD_ALLOWED_ACCOUNTS, and AWS_REGION.
    account: Annotated[str, Field(pattern=r"^[0-9]{12}$")] | None = None
    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$")] | None = None


class _FileModel(_Model):
    version: Literal[1]
    rules: tuple[_RuleModel, ...] = ()
    reconcile: _Reconcile = _Reconcile()


# -- the loaded configuration -----------------------------------------------------------------


@dataclass(frozen=True)
class PipelineConfig:
    """One validated version of the file (or the environment's defaults alone)."""

    source: str
    defaults: Rule
    rules: tuple[tuple[tuple[str, ...], Rule], ...] = ()
    reconcile_repositories: tuple[str, ...] = ()
    reconcile_account: str | None = None
    reconcile_region: str | None = None

    def rule_for(self, repository: str) -> Rule:
        """The first rule whose globs match ``repository``, else the environment's."""
        for patterns, rule in self.rules:
            if any(fnmatchcase(repository, p) for p in patterns):
                return rule
        return self.defaults


def parse_config(text: str | bytes, source: str, settings: Settings) -> PipelineConfig:
    """Validate one version of the file.

    Raises:
        ConfigurationError: ``<source>:<line>: <field>: <problem>`` for the first problem.
    """
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigurationError(f"{source}{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{source}:1: the file must be a mapping with 'version: 1'")
    try:
        model = _FileModel.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = tuple(error["loc"])
        lines = _lines(node)
        line = next(
            (lines[location[:n]] for n in range(len(location), -1, -1) if location[:n] in lines),
            1,
        )
        dotted = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in location)
        field = dotted.replace(".[", "[") or "(file)"
        message = error["msg"].removeprefix("Value error, ")
        raise ConfigurationError(f"{source}:{line}: {field}: {message}") from None
    reconcile = model.reconcile
    account = reconcile.account
    if account is None and len(settings.allowed_accounts) == 1:
        account = settings.allowed_accounts[0]
    if reconcile.repositories and account is None:
        raise ConfigurationError(
            f"{source}:{_lines(node).get(('reconcile',), 1)}: reconcile.account: required "
            "(the repositories' AWS account) unless BRANCHBUILD_ALLOWED_ACCOUNTS names one"
        )
    _check_reconcile(reconcile, account, settings, source, node)
    defaults = Rule.from_settings(settings)
    rules = tuple(
        (rule.repository, rule.resolve(defaults, index)) for index, rule in enumerate(model.rules)
    )
    for index, rule in enumerate(model.rules):
        if rule.project is not None and not rule.project.startswith(settings.project_prefix):
            line = _lines(node).get(("rules", index, "project"), 1)
            raise ConfigurationError(
                f"{source}:{line}: rules[{index}].project: {rule.project!r} does not begin with "
                f"BRANCHBUILD_PROJECT_PREFIX {settings.project_prefix!r} (the service may start "
                "only the projects whose name begins with it)"
            )
        if settings.notify_listed_topics_only:
            for topic in rule.notify.topics or ():
                if topic not in (*settings.notify_topics, *settings.notify_rule_topics):
                    line = _lines(node).get(("rules", index, "notify", "topics"), 1)
                    raise ConfigurationError(
                        f"{source}:{line}: rules[{index}].notify.topics: {topic!r} is not among "
                        "the topics the service may publish to (BRANCHBUILD_NOTIFY_TOPICS, "
                        "BRANCHBUILD_NOTIFY_RULE_TOPICS: the stack's NotifyTopicArns and "
                        "NotifyRuleTopicArns)"
                    )
    config = PipelineConfig(
        source=source,
        defaults=defaults,
        rules=rules,
        reconcile_repositories=reconcile.repositories,
        reconcile_account=account,
        reconcile_region=reconcile.region or region(),
    )
    _check_key_spaces(config, model, source, node)
    return config


def _check_reconcile(
    reconcile: _Reconcile,
    account: str | None,
    settings: Settings,
    source: str,
    node: yaml.Node | None,
) -> None:
    """Refuse reconciliation of what the allow-lists refuse: every push it found there was
    skipped in silence."""
    allowed = settings.allowed_accounts
    if account is not None and reconcile.repositories and allowed and account not in allowed:
        # Its pushes would all be refused (decide's allow-list), silently: refuse the file.
        line = _lines(node).get(("reconcile", "account"), 1)
        raise ConfigurationError(
            f"{source}:{line}: reconcile.account: {account!r} is not in "
            "BRANCHBUILD_ALLOWED_ACCOUNTS (every push it reconciles would be refused)"
        )
    # Likewise a repository or region the allow-lists refuse: reconciliation skipped them.
    for index, name in enumerate(reconcile.repositories):
        patterns = settings.allowed_repositories
        if patterns and not any(fnmatchcase(name, p) for p in patterns):
            line = _lines(node).get(("reconcile", "repositories", index), 1)
            raise ConfigurationError(
                f"{source}:{line}: reconcile.repositories[{index}]: {name!r} is not allowed by "
                "BRANCHBUILD_ALLOWED_REPOSITORIES (every push it reconciles would be refused)"
            )
    regions = settings.allowed_regions
    chosen = reconcile.region or region()
    if reconcile.repositories and regions and chosen:
        if not any(fnmatchcase(chosen, p) for p in regions):
            line = _lines(node).get(("reconcile", "region"), _lines(node).get(("reconcile",), 1))
            raise ConfigurationError(
                f"{source}:{line}: reconcile.region: {chosen!r} is not allowed by "
                "BRANCHBUILD_ALLOWED_REGIONS (every push it reconciles would be refused)"
            )


def _check_key_spaces(
    config: PipelineConfig, model: _FileModel, source: str, node: yaml.Node | None
) -> None:
    """Refuse two rules whose key templates can name one object for two repositories
    (issue 21: deleting a branch of one deleted the other's archives and ledger entries)."""
    spaces: list[tuple[int | None, KeySpace]] = []
    for index, (patterns, rule) in enumerate(config.rules):
        exact = len(patterns) == 1 and not any(c in patterns[0] for c in "*?[")
        serves = functools.partial(_serves, config, rule)
        spaces.append((index, KeySpace(rule.key_template, patterns[0] if exact else None, serves)))
        if "*" in patterns:  # the rules after it, and the environment's, take no repository
            break
    else:
        serves = functools.partial(_serves, config, config.defaults)
        spaces.append((None, KeySpace(config.defaults.key_template, None, serves)))
    for later, (j, b) in enumerate(spaces):
        for i, a in spaces[:later]:
            if not may_share_keys(a, b):
                continue
            # Blame a rule with its own key (two that take the environment's never meet).
            own = j if j is not None and model.rules[j].key is not None else i
            assert own is not None
            other, theirs = (i, a.template) if own == j else (j, b.template)
            named = (
                f"rules[{other}].key"
                if other is not None and model.rules[other].key is not None
                else f"{'' if other is None else f'rules[{other}]: '}BRANCHBUILD_KEY_TEMPLATE"
            )
            line = _lines(node).get(("rules", own, "key"), 1)
            raise ConfigurationError(
                f"{source}:{line}: rules[{own}].key: {config.rules[own][1].key_template!r} "
                f"can name the same object as {named} {theirs!r} for another repository "
                "(deleting a branch of one would delete the other's archives): begin it with "
                "a path segment only this rule writes, e.g. its repository's name"
            )


def _serves(config: PipelineConfig, rule: Rule, repository: str) -> bool:
    return config.rule_for(repository) is rule


def _lines(node: yaml.Node | None) -> dict[tuple[Any, ...], int]:
    """The 1-based line of every value in the document, by its path of keys and indexes."""
    found: dict[tuple[Any, ...], int] = {}

    def walk(current: yaml.Node, path: tuple[Any, ...]) -> None:
        found.setdefault(path, current.start_mark.line + 1)
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                found[(*path, name)] = key.start_mark.line + 1
                walk(value, (*path, name))
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                walk(item, (*path, index))

    if node is not None:
        walk(node, ())
    return found


# -- where the file lives, and reloading ------------------------------------------------------


class Pipelines:
    """The configuration in force; :class:`Watcher` swaps in each good new version."""

    def __init__(self, config: PipelineConfig) -> None:
        self.current = config

    @classmethod
    def from_settings(cls, settings: Settings) -> Pipelines:
        return cls(PipelineConfig(source="(environment)", defaults=Rule.from_settings(settings)))

    def rule_for(self, repository: str) -> Rule:
        return self.current.rule_for(repository)


class Watcher:
    """Reads the file at start-up and re-reads it when its mtime or S3 ETag changes."""

    def __init__(
        self, settings: Settings, pipelines: Pipelines, metrics: Metrics, s3: S3Client | None
    ) -> None:
        self.settings = settings
        self.pipelines = pipelines
        self.metrics = metrics
        self.s3 = s3
        self.location = settings.config or ""
        self._version: str | None = None

    async def load(self) -> None:
        """Load the file once, at start-up.

        Raises:
            ConfigurationError: the file is missing, unreadable or invalid.
        """
        version = await self._stat()
        self.pipelines.current = parse_config(await self._read(), self.location, self.settings)
        self._version = version
        log.info(
            "pipeline configuration %s: %s rule(s)",
            self.location,
            len(self.pipelines.current.rules),
        )

    async def run(self, stopping: anyio.Event) -> None:
        """Check for a new version every ``config_reload_interval`` seconds until stopping."""
        while not stopping.is_set():
            with anyio.move_on_after(self.settings.config_reload_interval):
                await stopping.wait()
            if not stopping.is_set():
                await self.check()

    async def check(self) -> bool:
        """Reload if the file changed; a bad version is refused and the last good one kept.

        Returns whether a new version is now in force. Never raises for a bad file.
        """
        try:
            version = await self._stat()
        except ConfigurationError as exc:
            return self._refuse(exc)
        if version == self._version:
            return False
        try:
            text = await self._read()
        except ConfigurationError as exc:  # unreadable for now: tried again next time
            return self._refuse(exc)
        self._version = version  # a bad version is refused once, not at every check
        try:
            config = parse_config(text, self.location, self.settings)
        except ConfigurationError as exc:
            return self._refuse(exc)
        self.pipelines.current = config
        self.metrics.config_reloads.labels(result="loaded").inc()
        log.info("pipeline configuration reloaded: %s rule(s)", len(config.rules))
        return True

    def _refuse(self, error: ConfigurationError) -> bool:
        self.metrics.config_reloads.labels(result="refused").inc()
        log.error("pipeline configuration refused; the last good one stays in force: %s", error)
        return False

    def _s3_location(self) -> tuple[str, str] | None:
        if not self.location.startswith("s3://"):
            return None
        bucket, _, key = self.location.removeprefix("s3://").partition("/")
        return bucket, key

    async def _stat(self) -> str:
        s3 = self._s3_location()
        if s3 is None:
            try:
                stat = await anyio.Path(self.location).stat()
            except OSError as exc:
                raise ConfigurationError(f"{self.location}: cannot read: {exc.strerror}") from None
            return f"{stat.st_mtime_ns}:{stat.st_size}"
        assert self.s3 is not None
        try:
            with translated(f"read {self.location}", transient=StorageError):
                reply = await self.s3.head_object(Bucket=s3[0], Key=s3[1])
        except BranchbuildError as exc:
            raise ConfigurationError(f"{self.location}: cannot read: {exc}") from None
        return str(reply.get("ETag", ""))

    async def _read(self) -> bytes:
        s3 = self._s3_location()
        if s3 is None:
            try:
                text = await anyio.Path(self.location).read_bytes()
            except OSError as exc:
                raise ConfigurationError(f"{self.location}: cannot read: {exc.strerror}") from None
        else:
            assert self.s3 is not None
            try:
                with translated(f"read {self.location}", transient=StorageError):
                    reply = await self.s3.get_object(Bucket=s3[0], Key=s3[1])
                    text = await reply["Body"].read()
            except BranchbuildError as exc:
                raise ConfigurationError(f"{self.location}: cannot read: {exc}") from None
        return text
