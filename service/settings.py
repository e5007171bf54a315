"""The one settings object: every ``BRANCHBUILD_*`` environment variable, typed and validated.

AWS endpoints, region and credentials are *not* here: botocore reads the standard variables
(``AWS_REGION``, ``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_SQS``, ...) itself, so the same
configuration runs against AWS, LocalStack or moto.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .errors import ConfigurationError

MiB = 1024 * 1024
GiB = 1024 * MiB

CommaList = Annotated[tuple[str, ...], NoDecode]
_SSH_HOST_PATTERN = re.compile(r"[A-Za-z0-9._*?-]+(:[0-9]+)?")


class BuildBackend(StrEnum):
    CODEBUILD = "codebuild"
    LOCAL = "local"


class PullRequestFeedback(StrEnum):
    OFF = "off"
    COMMENT = "comment"
    COMMENT_AND_APPROVAL = "comment+approval"


class LogFormat(StrEnum):
    AUTO = "auto"
    JSON = "json"
    TEXT = "text"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "branchbuild"


class LocalSettings(BaseSettings):
    """The settings that need no AWS resources: enough for ``branchbuild builds``."""

    model_config = SettingsConfigDict(
        env_prefix="BRANCHBUILD_", frozen=True, extra="ignore", env_ignore_empty=True
    )

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    local_builds_dir: Path | None = None
    log_format: LogFormat = LogFormat.AUTO
    log_level: str = "INFO"

    @property
    def builds_dir(self) -> Path:
        return self.local_builds_dir or self.cache_dir / "builds"

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level


class Settings(LocalSettings):
    """branchbuild's configuration, read once at start-up and passed in explicitly."""

    # Queues: the intake queue is the EventBridge rule's target (one static message group);
    # the work queue holds one message group per repository and branch.
    queue_url: str = Field(min_length=1)
    work_queue_url: str = Field(min_length=1)
    bucket: str = Field(min_length=3, max_length=63)

    key_template: str = "{repository}/{branch}/{commit}.zip"
    project_template: str = "{repository}"
    # Every project name (this template, a rule's `project`) must begin with it: the task
    # role may start only such projects (deploy/service.yaml sets it with the IAM grant).
    project_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9_-]*$")
    protected_branches: CommaList = ("test", "develop", "staging")
    include_branches: CommaList = ("*",)
    build_tags: bool = False
    allowed_accounts: CommaList = ()
    allowed_regions: CommaList = ()
    allowed_repositories: CommaList = ()

    git_url_template: str = (
        "ssh://{ssh_key_id}@git-codecommit.{region}.amazonaws.com/v1/repos/{repository}"
    )
    ssh_key_file: Path | None = None
    ssh_private_key: SecretStr | None = None
    ssh_key_id: str = ""
    known_hosts_file: Path | None = None
    known_hosts: str | None = None
    # CodeCommit's SSH endpoints offer only an ssh-rsa (SHA-1) host key and expect ssh-rsa
    # signatures from IAM's RSA keys; OpenSSH 8.8 and later refuse both by default. Enabled for
    # these hosts only, never globally.
    # The regional and FIPS hosts, China's (.amazonaws.com.cn), and the names of interface VPC
    # endpoints (vpce-<id>-<suffix>.git-codecommit.<region>.vpce.amazonaws.com).
    ssh_legacy_rsa_hosts: CommaList = (
        "git-codecommit.*.amazonaws.com",
        "git-codecommit-fips.*.amazonaws.com",
        "git-codecommit.*.amazonaws.com.cn",
        "*.git-codecommit.*.vpce.amazonaws.com",
        "*.git-codecommit-fips.*.vpce.amazonaws.com",
        "*.git-codecommit.*.vpce.amazonaws.com.cn",
    )
    ssh_connect_timeout: int = Field(default=15, ge=1, le=300)
    git_timeout: float = Field(default=900.0, gt=0)
    cache_max_bytes: int = Field(default=20 * GiB, ge=0)
    cache_dir: Path = Field(default_factory=_default_cache_dir)

    concurrency: int = Field(default=8, ge=1, le=256)
    # A killed instance's last long poll goes on without it, and what it picks up stays
    # invisible for the visibility timeout: a lane recovers within WAIT_TIME + visibility.
    wait_time: int = Field(default=5, ge=0, le=20)
    intake_visibility_timeout: int = Field(default=5, ge=2, le=43200)
    visibility_timeout: int = Field(default=20, ge=2, le=43200)  # the work queue's
    retry_base_delay: int = Field(default=10, ge=0, le=43200)
    retry_max_delay: int = Field(default=300, ge=0, le=43200)
    job_timeout: float = Field(default=3600.0, gt=0)
    shutdown_grace: float = Field(default=90.0, ge=0, le=3600)

    part_size: int = Field(default=8 * MiB, ge=5 * MiB, le=5 * GiB)
    upload_concurrency: int = Field(default=4, ge=1, le=64)
    max_parts_in_flight: int = Field(default=4, ge=1, le=1024)
    zip_level: int = Field(default=1, ge=0, le=9)
    max_archive_bytes: int = Field(default=5 * GiB, ge=1)
    max_file_bytes: int = Field(default=2 * GiB, ge=1)
    # Archive contents (docs/build-contents.md): submodules by default for rules that don't
    # say; the hosts an absolute submodule URL may name (ssh://, fnmatch globs); how deep
    # submodules of submodules go.
    submodules: bool = False
    submodule_hosts: CommaList = ()
    submodule_depth: int = Field(default=3, ge=1, le=20)

    # The pipeline configuration file (service/pipelines.py): a path or s3://bucket/key.
    config: str | None = None
    config_reload_interval: float = Field(default=30.0, gt=0)
    reconcile_interval: float = Field(default=600.0, gt=0)

    build_backend: BuildBackend = BuildBackend.CODEBUILD
    local_build_timeout: float = Field(default=1800.0, gt=0)

    # Build outcomes (issue 13): superseded running builds are stopped except on these
    # branches; results go to CodeCommit pull requests when asked for.
    keep_running_branches: CommaList = ()
    pull_request_feedback: PullRequestFeedback = PullRequestFeedback.OFF
    pull_request_role_template: str = ""

    # Capacity scheduling (service/scheduler.py, docs/capacity.md): at most this many builds
    # started by branchbuild running at once across the fleet (None: no limit); a waiting push
    # is dead-lettered after max_wait seconds; a refused start is tried again every
    # capacity_probe_interval seconds; the running set is checked with BatchGetBuilds every
    # running_reconcile_interval seconds.
    max_running: int | None = Field(default=None, ge=1)
    max_wait: float = Field(default=6 * 3600.0, gt=0)
    capacity_probe_interval: float = Field(default=5.0, gt=0, le=300)
    running_reconcile_interval: float = Field(default=60.0, gt=0)

    # Notifications (service/notify.py, docs/notifications.md): the SNS topics every rule
    # notifies unless it names its own, and the outcomes that notify.
    notify_topics: CommaList = ()
    notify_on: CommaList = ("failed", "fixed", "dead_lettered")
    # The other topics a rule's notify.topics may name (not notified by default) and, when
    # only those may be named (deploy/service.yaml: the task role may publish to them and to
    # notify_topics only), a rule naming any other refuses the file.
    notify_rule_topics: CommaList = ()
    notify_listed_topics_only: bool = False
    # Status badges (service/badges.py, docs/badges-and-retries.md): an SVG per branch and
    # pull request in the artifact bucket; the base URL they are served from, for links.
    badges: bool = False
    badges_url: Annotated[str, Field(pattern=r"^(|https?://[^\s?#]+)$")] = ""

    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)
    liveness_timeout: float = Field(default=90.0, gt=0)

    @field_validator(
        "protected_branches",
        "include_branches",
        "allowed_accounts",
        "allowed_regions",
        "allowed_repositories",
        "ssh_legacy_rsa_hosts",
        "keep_running_branches",
        "submodule_hosts",
        "notify_topics",
        "notify_on",
        "notify_rule_topics",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("notify_topics")
    @classmethod
    def _notify_topics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_topics(value)

    @field_validator("notify_rule_topics")
    @classmethod
    def _notify_rule_topics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_topics(value)

    @field_validator("notify_on")
    @classmethod
    def _notify_on(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_notify_on(value)

    @field_validator("allowed_accounts")
    @classmethod
    def _account_ids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Matched exactly: a pattern ("*", "1234*") would let an event name any account, and
        # the pull request role is assumed in the account an event names.
        for account in value:
            if not re.fullmatch(r"[0-9]{12}", account):
                raise ValueError(f"{account!r} is not a 12-digit AWS account id")
        return value

    @field_validator("ssh_legacy_rsa_hosts", "submodule_hosts")
    @classmethod
    def _ssh_host_patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # They are written into the generated SSH config: host patterns only, nothing else.
        for pattern in value:
            if not _SSH_HOST_PATTERN.fullmatch(pattern):
                raise ValueError(
                    f"{pattern!r} is not an SSH host pattern (letters, digits, . - _ * ?)"
                )
        return value

    @field_validator("pull_request_role_template")
    @classmethod
    def _role_template_fields(cls, value: str) -> str:
        if value:
            check_template(value, {"account"}, required=set())
            if not value.startswith("arn:"):
                raise ValueError("must be an IAM role ARN, e.g. arn:aws:iam::{account}:role/NAME")
        return value

    @field_validator("key_template")
    @classmethod
    def _key_template_fields(cls, value: str) -> str:
        check_key_template(value)
        return value

    @field_validator("project_template")
    @classmethod
    def _project_template_fields(cls, value: str) -> str:
        check_template(value, {"repository", "branch"}, required=set())
        return value

    @field_validator("git_url_template")
    @classmethod
    def _git_url_template_fields(cls, value: str) -> str:
        check_template(value, {"repository", "region", "ssh_key_id"}, required={"repository"})
        if not value.startswith(("ssh://", "file://", "/")):
            raise ValueError("must be an ssh:// URL (or file:// for local tests)")
        return value

    @field_validator("config")
    @classmethod
    def _config_location(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("s3://"):
            bucket, _, key = value.removeprefix("s3://").partition("/")
            if not bucket or not key:
                raise ValueError("must be a file path or s3://bucket/key")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.ssh_key_file is not None and self.ssh_private_key is not None:
            raise ValueError(
                "set BRANCHBUILD_SSH_KEY_FILE or BRANCHBUILD_SSH_PRIVATE_KEY, not both"
            )
        if self.known_hosts_file is not None and self.known_hosts is not None:
            raise ValueError(
                "set BRANCHBUILD_KNOWN_HOSTS_FILE or BRANCHBUILD_KNOWN_HOSTS, not both"
            )
        if not self.project_template.startswith(self.project_prefix):
            raise ValueError(
                f"BRANCHBUILD_PROJECT_TEMPLATE {self.project_template!r} does not begin with "
                f"BRANCHBUILD_PROJECT_PREFIX {self.project_prefix!r}: the service may start "
                "only the projects whose name begins with it"
            )
        if self.pull_request_role_template and not self.allowed_accounts:
            raise ValueError(
                "BRANCHBUILD_ALLOWED_ACCOUNTS must list the repository accounts when "
                "BRANCHBUILD_PULL_REQUEST_ROLE_TEMPLATE is set: the role is assumed in the "
                "account an event names"
            )
        if self.retry_max_delay < self.retry_base_delay:
            raise ValueError(
                "BRANCHBUILD_RETRY_MAX_DELAY must be at least BRANCHBUILD_RETRY_BASE_DELAY"
            )
        return self


def check_template(template: str, allowed: set[str], *, required: set[str]) -> None:
    import string

    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"is not a valid template: {exc}") from None
    unknown = fields - allowed
    if unknown:
        raise ValueError(
            f"unknown field(s) {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    missing = required - fields
    if missing:
        raise ValueError(f"must contain {', '.join('{' + m + '}' for m in sorted(missing))}")


KEY_FIELDS = frozenset({"repository", "branch", "ref", "commit"})


def check_key_template(template: str, *, one_repository: bool = False) -> None:
    """Refuse an archive key template under which two branches could share a key.

    Every per-branch operation (the ledger, the clean-up of a deleted branch, aborting a
    killed job's upload) finds a branch's objects by its template, so the template must give
    every (repository, ref, commit) its own key, and no key may be another's ledger entry:

    * ``{branch}`` or ``{ref}``, each a whole path segment (``/`` before it, or the start;
      ``/`` after it): a branch name's own ``/`` then only adds segments, and branch ``a``
      never matches ``a-b/...`` nor ``a/b/...``;
    * no ``{repository}`` in the last segment (a repository's name may end in
      ``.build.json``: its archive would be another's ledger entry);
    * ``{repository}``, unless the template serves one repository only (a rule naming one).

    Raises:
        ValueError: the reason, with an example of a template that is accepted.
    """
    check_template(template, set(KEY_FIELDS), required={"commit"})
    example = "e.g. {repository}/{branch}/{commit}.zip"
    import string

    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is not None and (spec or conversion):
            # {commit:.7} gave two commits one key, and no branch's pattern matched its keys
            raise ValueError(
                f"{{{field}}} may have no format spec or conversion (a shortened or padded "
                f"name is no longer one key per branch and commit), {example}"
            )
    segments = template.split("/")
    for field in ("branch", "ref"):
        for index, segment in enumerate(segments):
            if "{" + field + "}" in segment and (
                segment != "{" + field + "}" or index == len(segments) - 1
            ):
                raise ValueError(
                    f"{{{field}}} must be a whole path segment followed by '/' (so one "
                    f"branch's keys never match another's), {example}"
                )
    if "{branch}" not in segments and "{ref}" not in segments:
        raise ValueError(
            "must contain {branch} or {ref}: without it every branch shares one set of keys "
            f"(a deleted branch would take every branch's archives), {example}"
        )
    if "{repository}" in segments[-1]:
        raise ValueError(
            "the last path segment may not hold {repository} (a repository named "
            f"'<name>.build.json' would name another's ledger entry), {example}"
        )
    if template.endswith(".json"):
        # An archive named <x>.build.json read as the ledger entry of <x>: the clean-up of a
        # branch deleted a tag's archive that it meant to keep.
        raise ValueError(
            "may not end in '.json' (the documents beside an archive are "
            f"'<archive>.build.json', '.feedback.json' and '.merge.json'), {example}"
        )
    if not one_repository and "{repository}" not in template:
        raise ValueError(
            "must contain {repository}: without it two repositories' branches of the same name "
            f"share their keys, {example}"
        )


# Notifications (service/notify.py): the outcomes a rule may notify, and what a topic is.
NOTIFY_OUTCOMES = ("failed", "fixed", "succeeded", "stopped", "dead_lettered")
_TOPIC_ARN = re.compile(
    r"arn:aws[a-z-]*:sns:[a-z]{2}(-[a-z]+)+-[0-9]{1,2}:[0-9]{12}:[A-Za-z0-9_-]{1,256}"
)


def check_topics(topics: tuple[str, ...]) -> tuple[str, ...]:
    """Return ``topics`` if each is an SNS topic ARN.

    Raises:
        ValueError: naming the first that is not.
    """
    for topic in topics:
        if not _TOPIC_ARN.fullmatch(topic.removesuffix(".fifo")):
            raise ValueError(
                f"{topic[:300]!r} is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)"
            )
    return topics


def check_notify_on(outcomes: tuple[str, ...]) -> tuple[str, ...]:
    """Return ``outcomes`` if each is one that notifies.

    Raises:
        ValueError: naming the first that is not.
    """
    for outcome in outcomes:
        if outcome not in NOTIFY_OUTCOMES:
            raise ValueError(f"{outcome[:40]!r} is not one of {', '.join(NOTIFY_OUTCOMES)}")
    return outcomes


# Settings that no longer exist, and what replaced them: a deployment that still sets one
# must not silently run with something else.
_REPLACED = {
    "BRANCHBUILD_HEARTBEAT_INTERVAL": (
        "a heartbeat every third of BRANCHBUILD_INTAKE_VISIBILITY_TIMEOUT and "
        "BRANCHBUILD_VISIBILITY_TIMEOUT"
    ),
}


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment (and explicit overrides, for tests).

    Raises:
        ConfigurationError: with one line naming the first offending variable.
    """
    for variable, replacement in _REPLACED.items():
        if os.environ.get(variable):
            raise ConfigurationError(f"{variable} is no longer used: see {replacement}")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None


def load_local_settings() -> LocalSettings:
    """The subset of settings for commands that touch no AWS resource.

    Raises:
        ConfigurationError: with one line naming the first offending variable.
    """
    try:
        return LocalSettings()
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = [str(part) for part in error["loc"]]
    message = error["msg"].removeprefix("Value error, ")
    if not location:
        return message
    variable = "BRANCHBUILD_" + location[0].upper()
    if error["type"] == "missing":
        return f"{variable} is required but not set"
    value = error.get("input")
    shown = (
        ""
        if isinstance(value, dict | SecretStr) or location[0] == "ssh_private_key"
        else (f" (got {value!r})")
    )
    return f"{variable}: {message}{shown}"
