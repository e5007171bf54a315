"""/healthz, /readyz and /metrics over real HTTP."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from service.health import Health, bound_port, serve_http
from service.metrics import Metrics
from tests.helpers import wait_for


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as reply:
            return reply.status, await reply.text()


async def test_liveness_fails_when_a_loop_stops_beating() -> None:
    health = Health(liveness_timeout=0.3)
    async with serve_http(health, Metrics(), host="127.0.0.1", port=0) as runner:
        port = bound_port(runner)
        assert await get(port, "/healthz") == (503, "stalled: not started\n")
        health.beat("intake")
        health.beat("worker")
        assert (await get(port, "/healthz"))[0] == 200

        async def stalled() -> str | None:
            health.beat("intake")  # intake keeps beating; the worker is stuck
            status, text = await get(port, "/healthz")
            return text if status == 503 else None

        assert await wait_for(stalled, within=10) == "stalled: worker\n"


async def test_readiness_follows_consuming_and_draining() -> None:
    health = Health(liveness_timeout=60)
    async with serve_http(health, Metrics(), host="127.0.0.1", port=0) as runner:
        port = bound_port(runner)
        assert await get(port, "/readyz") == (503, "starting\n")
        health.ready = True
        assert await get(port, "/readyz") == (200, "ready\n")
        health.draining = True
        assert await get(port, "/readyz") == (503, "draining\n")


async def test_metrics_are_prometheus_text() -> None:
    metrics = Metrics()
    metrics.jobs.labels(outcome="built").inc()
    metrics.stage_seconds.labels(stage="fetch").observe(0.2)
    async with serve_http(Health(liveness_timeout=60), metrics, host="127.0.0.1", port=0) as runner:
        status, text = await get(bound_port(runner), "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["branchbuild_jobs"].samples[0].value == 1
    assert "branchbuild_stage_duration_seconds" in families
    info = families["branchbuild_build_info"].samples[0]
    assert not any(name.endswith("_created") for name in families)
    assert info.labels["version"]
