"""What the local AWS stand-ins share: an HTTP server on one port that speaks one service's
JSON protocol (``POST /`` with ``X-Amz-Target: <prefix><Operation>``), every request validated
against botocore's own model of that service before it is served, and errors answered as AWS
answers them (``__type`` and ``message``). The CodeCommit (:mod:`.codecommit`) and CodeBuild
(:mod:`.codebuild`) stand-ins are built on it.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Self

import botocore.session
from aiohttp import web
from botocore.model import OperationNotFoundError, Shape, StringShape
from botocore.validate import ParamValidator

__all__ = ["JsonStandIn", "StandInError", "validate"]

_CONTENT_TYPE = "application/x-amz-json-1.1"


class StandInError(Exception):
    """An error answered the way CodeCommit answers it (``__type`` and ``message``)."""

    def __init__(self, code: str, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status  # the HTTP status (AWS's JSON services answer 400; a proxy, 429)


def validate(operation: str, params: Any, *, service: str = "codecommit") -> None:
    """Check a request against botocore's model of ``service`` (CodeCommit here, CodeBuild in
    :mod:`localdev.codebuild`), as the real service would.

    Raises:
        StandInError: unknown operation, or parameters the model does not allow.
    """
    model = botocore.session.get_session().get_service_model(service)
    try:
        shape = model.operation_model(operation).input_shape
    except OperationNotFoundError:
        raise StandInError("UnknownOperationException", f"unknown operation {operation}") from None
    if not isinstance(params, dict):
        raise StandInError("SerializationException", "the request body is not a JSON object")
    if shape is None:
        if params:
            raise StandInError("ValidationException", f"{operation} takes no parameters")
        return
    report = ParamValidator().validate(params, shape)
    problems = [report.generate_report()] if report.has_errors() else []
    problems += _beyond_botocore(params, shape, operation)
    if problems:
        raise StandInError("ValidationException", "; ".join(problems))


def _beyond_botocore(value: Any, shape: Shape | None, path: str) -> list[str]:
    """What ParamValidator leaves out: maximum lengths and enums (AWS checks both)."""
    if shape is None:
        return []
    problems: list[str] = []
    if shape.type_name == "structure" and isinstance(value, dict):
        for name, member in shape.members.items():  # type: ignore[attr-defined]
            if name in value:
                problems += _beyond_botocore(value[name], member, f"{path}.{name}")
    elif shape.type_name == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            problems += _beyond_botocore(item, shape.member, f"{path}[{i}]")  # type: ignore[attr-defined]
    elif isinstance(shape, StringShape) and isinstance(value, str):
        problems += _string_problems(value, shape, path)
    elif shape.type_name == "integer" and isinstance(value, int):
        limit = shape.metadata.get("max")
        if limit is not None and value > limit:
            problems.append(f"{path}: more than {limit}")
    return problems


def _string_problems(value: str, shape: StringShape, path: str) -> list[str]:
    problems: list[str] = []
    limit = shape.metadata.get("max")
    if limit is not None and len(value) > limit:
        problems.append(f"{path}: longer than {limit}")
    pattern = shape.metadata.get("pattern")
    if pattern and not re.fullmatch(pattern, value):
        problems.append(f"{path}: does not match {pattern}")
    if shape.enum and value not in shape.enum:
        problems.append(f"{path}: {value!r} is not one of {', '.join(shape.enum)}")
    return problems


class JsonStandIn:
    """The server's life and the protocol's envelope; a subclass answers :meth:`call`.

    ``async with`` it, then point ``AWS_ENDPOINT_URL_<SERVICE>`` at :attr:`endpoint`.
    """

    #: ``X-Amz-Target``'s prefix (``CodeCommit_20150413.``) and botocore's service name.
    target_prefix = ""
    service = ""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def port(self) -> int:
        assert self._site is not None, "not started"
        server = self._site._server
        assert isinstance(server, asyncio.base_events.Server)
        return int(server.sockets[0].getsockname()[1])

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post("/", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self._port)
        await self._site.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def call(
        self, operation: str, params: dict[str, Any], request: web.Request
    ) -> dict[str, Any]:
        """Answer one valid request.

        Raises:
            StandInError: answered as the service's error.
        """
        raise NotImplementedError

    def refused(self, error: StandInError) -> StandInError:
        """The error answered for a request the model refuses (each service names it its way)."""
        return error

    def answered_error(self, error: StandInError) -> None:
        """Called for every error answer (a subclass may count them)."""

    async def _serve(self, request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", "")
        try:
            if not target.startswith(self.target_prefix):
                raise StandInError("UnknownOperationException", f"bad X-Amz-Target {target!r}")
            operation = target.removeprefix(self.target_prefix)
            try:
                params = json.loads(await request.read() or b"{}")
            except ValueError:
                raise StandInError("SerializationException", "the body is not JSON") from None
            try:
                validate(operation, params, service=self.service)
            except StandInError as exc:
                raise self.refused(exc) from None
            reply = await self.call(operation, params, request)
        except StandInError as exc:
            self.answered_error(exc)
            body = {"__type": exc.code, "message": str(exc)} if exc.code else {"message": str(exc)}
            return web.json_response(body, status=exc.status, content_type=_CONTENT_TYPE)
        return web.json_response(reply, content_type=_CONTENT_TYPE)
