"""A fault-injecting HTTP proxy in front of the emulator, on 127.0.0.1.

Requests are forwarded unchanged unless a fault matches: then the proxy answers with the
error AWS would send (or drops the connection), a given number of times.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import anyio
from aiohttp import web

Match = Callable[[web.Request], bool]


@dataclass
class Fault:
    match: Match
    status: int = 503
    body: bytes = b""
    content_type: str = "application/xml"
    times: int = 1
    drop: bool = False  # close the connection without an answer
    body_contains: bytes = b""  # and the request body must contain this
    hold: anyio.Event | None = None  # forward only once this is set (a request in flight)
    hits: int = 0


def s3_error(code: str, status: int, *, match: Match, times: int) -> Fault:
    body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
    return Fault(match=match, status=status, body=body, times=times)


def json_error(code: str, *, match: Match, times: int) -> Fault:
    body = f'{{"__type": "{code}", "message": "injected"}}'.encode()
    return Fault(
        match=match, status=400, body=body, content_type="application/x-amz-json-1.1", times=times
    )


def target(suffix: str) -> Match:
    """Match JSON-protocol calls by their X-Amz-Target (CodeBuild, SQS)."""
    return lambda request: request.headers.get("X-Amz-Target", "").endswith(suffix)


def sqs_call(request: web.Request) -> bool:
    return request.headers.get("X-Amz-Target", "").startswith("AmazonSQS.")


def upload_part(request: web.Request) -> bool:
    return request.method == "PUT" and "partNumber" in request.query


@dataclass
class FaultProxy:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    port: int = 0
    forwarded: int = 0
    errors: list[str] = field(default_factory=list)
    # Every JSON-protocol call seen: (X-Amz-Target, request body).
    calls: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if "X-Amz-Target" in request.headers:
            self.calls.append((request.headers["X-Amz-Target"], body))
        for fault in self.faults:
            if fault.hits < fault.times and fault.match(request) and fault.body_contains in body:
                fault.hits += 1
                if fault.hold is not None:
                    await fault.hold.wait()
                    break
                if fault.drop:
                    assert request.transport is not None
                    request.transport.close()
                    return web.Response(status=500)  # never sent: the connection is gone
                return web.Response(
                    status=fault.status, body=fault.body, content_type=fault.content_type
                )
        self.forwarded += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        try:
            async with self._session.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=io.BytesIO(body),
            ) as reply:
                payload = await reply.read()
                answer = {k: v for k, v in reply.headers.items() if k.lower() not in _HOP}
                return web.Response(status=reply.status, body=payload, headers=answer)
        except Exception as exc:  # the test reads .errors: a proxy bug must not pass as a fault
            self.errors.append(f"{request.method} {request.path_qs}: {exc!r}")
            return web.Response(status=502, text=repr(exc))

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FaultProxy]:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(runner.addresses[0][1])
        try:
            yield self
        finally:
            await runner.cleanup()
            await self._session.close()


_HOP = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "content-encoding",
    "keep-alive",
}
