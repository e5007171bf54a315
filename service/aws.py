"""AWS clients and the mapping of botocore failures onto branchbuild's error tree."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aioboto3
import anyio
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from .errors import AccessDenied, PermanentError, TransientError

if TYPE_CHECKING:
    from types_aiobotocore_codebuild import CodeBuildClient
    from types_aiobotocore_codecommit import CodeCommitClient
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_sqs import SQSClient

calls_log = logging.getLogger("branchbuild.aws")

# The request parameters that name what a call acts on: what IAM authorizes it against.
RESOURCE_PARAMETERS = (
    "QueueUrl",
    "QueueName",
    "Bucket",
    "Key",
    "projectName",
    "names",
    "id",
    "ids",
    "repositoryName",
    "pullRequestId",
    "commentId",
    "RoleArn",
    "TopicArn",
)

# Codes that no retry can fix: the configuration or the permissions must change first.
PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "AllAccessDisabled",
        "AWS.SimpleQueueService.NonExistentQueue",
        "QueueDoesNotExist",
        "InvalidAccessKeyId",
        "KMS.AccessDeniedException",
        "NoSuchBucket",
        "ResourceNotFoundException",
        "InvalidInputException",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)


def region() -> str | None:
    """The region from ``AWS_REGION`` (what ECS and most tools set), which botocore itself
    does not read, else botocore's own chain (``AWS_DEFAULT_REGION``, the profile)."""
    return os.environ.get("AWS_REGION") or None


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


@contextmanager
def translated(
    action: str,
    *,
    transient: type[TransientError] = TransientError,
    permanent: type[PermanentError] = AccessDenied,
) -> Iterator[None]:
    """Re-raise botocore failures of ``action`` as transient or permanent branchbuild errors."""
    try:
        yield
    except ClientError as exc:
        code = error_code(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        detail = f"cannot {action}: {code}{': ' + message if message else ''}"
        if code in PERMANENT_CODES:
            raise permanent(detail) from exc
        raise transient(detail) from exc
    except (BotoCoreError, OSError) as exc:
        raise transient(f"cannot {action}: {exc}") from exc


@dataclass(frozen=True)
class Clients:
    sqs: SQSClient
    s3: S3Client
    codebuild: CodeBuildClient
    codecommit: CodeCommitClient  # pull request feedback (service.pullrequests)
    session: aioboto3.Session
    config: AioConfig


async def open_clients(
    stack: AsyncExitStack,
    *,
    max_pool: int,
    on_retry: Callable[[str, int], None] | None = None,
) -> Clients:
    """Open one long-lived client per service (never one per event).

    Endpoints, region and credentials come from the standard AWS variables. ``on_retry``
    hears, per service, how many retries botocore made inside each call.
    """
    session = aioboto3.Session(region_name=region())
    watch_calls(session, role="service")
    config = AioConfig(
        retries={"mode": "standard", "max_attempts": 4},
        connect_timeout=5,
        read_timeout=40,  # above the 20 s long poll
        max_pool_connections=max_pool,
    )
    sqs = await stack.enter_async_context(session.client("sqs", config=config))
    s3 = await stack.enter_async_context(session.client("s3", config=config))
    codebuild = await stack.enter_async_context(session.client("codebuild", config=config))
    codecommit = await stack.enter_async_context(session.client("codecommit", config=config))
    if on_retry is not None:
        for name, client in (
            ("sqs", sqs),
            ("s3", s3),
            ("codebuild", codebuild),
            ("codecommit", codecommit),
        ):
            client.meta.events.register("after-call.*.*", _retry_counter(name, on_retry))
    return Clients(
        sqs=sqs, s3=s3, codebuild=codebuild, codecommit=codecommit, session=session, config=config
    )


@dataclass
class _Assumed:
    """A CodeCommit client with an assumed role's credentials, and what closes it."""

    client: CodeCommitClient
    expires: datetime
    stack: AsyncExitStack


class AccountClients:
    """CodeCommit clients per repository account: the service's own, or (multi-account) one
    with the credentials of a role assumed in that account (``sts:AssumeRole``), refreshed
    before they expire.

    Each account has its own lock (one account's slow STS never holds up another's). A
    replaced client is kept until the next refresh (a call may still be using it), then
    closed: at most two clients per account are open, whatever the uptime.
    """

    def __init__(self, clients: Clients, stack: AsyncExitStack, role_template: str) -> None:
        self.clients = clients
        self.role_template = role_template
        self._assumed: dict[str, _Assumed] = {}
        self._retired: dict[str, _Assumed] = {}
        self._locks: dict[str, anyio.Lock] = {}  # one per account seen (allow-listed)
        self.closed = 0  # replaced clients closed so far
        stack.push_async_callback(self.aclose)

    def open_clients(self) -> int:
        """How many assumed-role clients are open now."""
        return len(self._assumed) + len(self._retired)

    async def codecommit(self, account: str) -> CodeCommitClient:
        """Raises: AccessDenied (the role may not be assumed), TransientError."""
        if not self.role_template:
            return self.clients.codecommit
        async with self._locks.setdefault(account, anyio.Lock()):
            cached = self._assumed.get(account)
            if cached and cached.expires - datetime.now(UTC) > timedelta(minutes=5):
                return cached.client
            role = self.role_template.format(account=account)
            async with self.clients.session.client("sts", config=self.clients.config) as sts:
                with translated(f"assume {role}"):
                    reply = await sts.assume_role(RoleArn=role, RoleSessionName="branchbuild")
            credentials = reply["Credentials"]
            # Its own session, so that its calls are recorded as made with the assumed role
            # (tests/test_iam.py evaluates them against that role's policy, not ours); its own
            # stack, so that the client is closed when a newer one has replaced it.
            assumed = aioboto3.Session(
                region_name=region(),
                aws_access_key_id=credentials["AccessKeyId"],
                aws_secret_access_key=credentials["SecretAccessKey"],
                aws_session_token=credentials["SessionToken"],
            )
            watch_calls(assumed, role="service", assumed_role=role)
            stack = AsyncExitStack()
            client = await stack.enter_async_context(
                assumed.client("codecommit", config=self.clients.config)
            )
            self._assumed[account] = _Assumed(client, credentials["Expiration"], stack)
            retired = self._retired.pop(account, None)
            if cached is not None:
                self._retired[account] = cached
            if retired is not None:
                await self._close(retired)
            return client

    async def aclose(self) -> None:
        """Close every assumed-role client (at shutdown)."""
        for assumed in [*self._assumed.values(), *self._retired.values()]:
            await self._close(assumed)
        self._assumed.clear()
        self._retired.clear()

    async def _close(self, assumed: _Assumed) -> None:
        with anyio.CancelScope(shield=True):
            await assumed.stack.aclose()
        self.closed += 1


def _retry_counter(service: str, on_retry: Callable[[str, int], None]) -> Callable[..., None]:
    def count(parsed: dict[str, Any] | None = None, **_: Any) -> None:
        attempts = int((parsed or {}).get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)
        if attempts:
            on_retry(service, attempts)

    return count


_NAMED: ContextVar[dict[str, str] | None] = ContextVar("branchbuild_named", default=None)


@contextmanager
def naming(**names: str) -> Iterator[None]:
    """Name, for the ``aws_call`` records of the calls inside, a resource that their
    parameters do not name: CodeCommit's pull request calls act on a repository that most of
    them name only by pull request or comment id."""
    token = _NAMED.set((_NAMED.get() or {}) | names)
    try:
        yield
    finally:
        _NAMED.reset(token)


def watch_calls(session: aioboto3.Session, *, role: str, assumed_role: str = "") -> None:
    """Log every AWS call of the clients ``session`` makes, at DEBUG, as one ``aws_call``
    record once it is answered: the ``role`` making it (``service`` or ``admin``), the role ARN
    whose credentials it used if they are an ``assumed_role``'s, the service, the operation,
    the parameters naming its resources (never bodies or other values) and the error code,
    if any.

    Registered on the session, so every client and every operation is seen, including ones
    added later; tests/test_iam.py checks each recorded call against the IAM policies in
    deploy/. Costs a level check per call when DEBUG is off.
    """

    def remember(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if calls_log.isEnabledFor(logging.DEBUG):
            named: dict[str, Any] = {k: params[k] for k in RESOURCE_PARAMETERS if k in params}
            deleted = params.get("Delete")
            if isinstance(deleted, dict):  # DeleteObjects: IAM authorizes each key it names
                named["Keys"] = [o.get("Key") for o in deleted.get("Objects", [])]
            context["branchbuild_resources"] = (_NAMED.get() or {}) | named

    def record(model: Any, context: dict[str, Any], parsed: Any = None, **_: Any) -> None:
        if "branchbuild_resources" not in context:
            return
        error = (parsed or {}).get("Error", {}).get("Code", "") if isinstance(parsed, dict) else ""
        call = {
            "role": role,
            "service": model.service_model.service_name,
            "operation": model.name,
            "resources": context["branchbuild_resources"],
            "error": error,
        }
        if assumed_role:
            call["assumed_role"] = assumed_role
        calls_log.debug(
            "aws call %s:%s", call["service"], call["operation"], extra={"aws_call": call}
        )

    session.events.register("before-parameter-build", remember)
    session.events.register("after-call", record)
