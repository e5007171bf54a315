"""The small HTTP server: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import Metrics

log = logging.getLogger("branchbuild.health")


class Health:
    """Liveness from loop heartbeats, readiness from the consumers' state."""

    def __init__(self, *, liveness_timeout: float) -> None:
        self.liveness_timeout = liveness_timeout
        self._beats: dict[str, float] = {}
        self.ready = False
        self.draining = False

    def beat(self, loop: str) -> None:
        """Called by each consume loop every time it makes progress (or waits, on purpose)."""
        self._beats[loop] = anyio.current_time()

    def stalled(self) -> list[str]:
        now = anyio.current_time()
        return sorted(n for n, t in self._beats.items() if now - t > self.liveness_timeout)

    def alive(self) -> bool:
        return bool(self._beats) and not self.stalled()


@asynccontextmanager
async def serve_http(
    health: Health, metrics: Metrics, *, host: str, port: int
) -> AsyncIterator[web.AppRunner]:
    """Serve until the context exits. ``port=0`` picks a free port (see ``bound_port``)."""

    async def healthz(_: web.Request) -> web.Response:
        if health.alive():
            return web.Response(text="ok\n")
        stalled = ", ".join(health.stalled()) or "not started"
        return web.Response(status=503, text=f"stalled: {stalled}\n")

    async def readyz(_: web.Request) -> web.Response:
        if health.ready and not health.draining:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="draining\n" if health.draining else "starting\n")

    async def metrics_view(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics_view),
        ]
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("serving /healthz, /readyz and /metrics on %s:%s", host, bound_port(runner))
    try:
        yield runner
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()


def bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("the HTTP server is not listening")
