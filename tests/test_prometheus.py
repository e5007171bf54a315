"""A real Prometheus server scrapes the running service while a real push is built.

Prometheus and promtool come from Debian's ``prometheus`` package (``make system-deps``).
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import pytest

from service.events import codecommit_event
from tests.conftest import free_port
from tests.helpers import (
    AwsResources,
    GitWorld,
    ServiceProcess,
    StartService,
    WorkCopy,
    create_project,
    wait_for,
)

pytestmark = pytest.mark.e2e

JOB = "branchbuild"
BUILT = 'sum(branchbuild_jobs_total{outcome="built"}) or vector(0)'


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed: run `make system-deps`"
    return path


class Prometheus:
    """A Prometheus server on 127.0.0.1 scraping one target every second."""

    def __init__(self, target: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            f"  - job_name: {JOB}\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.data = workdir / "tsdb"
        self.log = workdir / "prometheus.log"
        self.process: anyio.abc.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = await anyio.open_process(
                [
                    tool("prometheus"),
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=out,
            )
        await wait_for(self.ready, within=30, what="Prometheus to be ready")

    async def ready(self) -> bool:
        assert self.process is not None
        if self.process.returncode is not None:
            raise RuntimeError(f"prometheus exited {self.process.returncode}: {self.logs()}")
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{self.url}/-/ready") as reply:
                    return reply.status == 200
        except aiohttp.ClientError:
            return False

    async def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query; the result vector."""
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"{self.url}/api/v1/query", params={"query": expression}
            ) as reply:
                body = await reply.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, expression: str) -> float | None:
        """The value of a single-sample query, or None while it has no sample."""
        result = await self.query(expression)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(20):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
async def service(start_service: StartService) -> ServiceProcess:
    return await start_service()


@pytest.fixture
async def prometheus(service: ServiceProcess, tmp_path: Path) -> AsyncIterator[Prometheus]:
    server = Prometheus(f"127.0.0.1:{service.port}", tmp_path)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


async def test_prometheus_scrapes_a_build_as_it_happens(
    aws: AwsResources,
    git_world: GitWorld,
    tmp_path: Path,
    service: ServiceProcess,
    prometheus: Prometheus,
) -> None:
    async def up() -> bool:
        return await prometheus.value(f'up{{job="{JOB}"}}') == 1

    await wait_for(up, within=30, what="the first successful scrape")
    # The build info is scraped, and no job has been built yet.
    info = await prometheus.query('branchbuild_build_info{job="branchbuild"}')
    assert [sample["metric"]["version"] for sample in info] == ["0.1.0"]
    assert await prometheus.value(BUILT) == 0
    await promtool_accepts(service)

    await create_project(aws, "scraped")
    repo = await WorkCopy.create(git_world, tmp_path, "scraped")
    await repo.commit({"README.md": "# scraped\n"})
    await repo.push("main:feature/metrics")
    await aws.send_event(codecommit_event(git_world.changes[-1]))

    async def built() -> bool:
        return await prometheus.value(BUILT) == 1

    await wait_for(built, within=60, what="Prometheus to scrape branchbuild_jobs_total == 1")
    assert await prometheus.value('sum(branchbuild_builds_started_total{job="branchbuild"})') == 1
    assert await prometheus.value(f'up{{job="{JOB}"}}') == 1
    stages = await prometheus.query("branchbuild_stage_duration_seconds_count")
    assert {s["metric"]["stage"] for s in stages} >= {"fetch", "upload", "start_build"}
    await promtool_accepts(service)  # now with samples in every histogram


async def promtool_accepts(service: ServiceProcess) -> None:
    """``promtool check metrics`` (format and naming lint) passes on the live exposition."""
    status, exposition = await service.get("/metrics")
    assert status == 200
    checked = await anyio.run_process(
        [tool("promtool"), "check", "metrics"], input=exposition.encode(), check=False
    )
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()
