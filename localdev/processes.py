"""The local stack's processes: LocalStack in host mode, and children that log to files and stop
with the stack."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import anyio
import anyio.abc

if TYPE_CHECKING:
    pass

from .options import ROOT, Options

log = logging.getLogger("branchbuild.localdev")


# -- LocalStack -------------------------------------------------------------------------------


async def healthy(endpoint: str) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            async with http.get(f"{endpoint}/_localstack/health") as reply:
                return reply.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


LOCALSTACK_PYTHON = ROOT / ".localstack-venv" / "bin" / "python"


def localstack_env(volume: Path, port: int) -> dict[str, str]:
    """The LocalStack community runtime in host mode on 127.0.0.1 (docs/local-development.md)."""
    address = f"127.0.0.1:{port}"
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(volume),
        "GATEWAY_LISTEN": address,
        "LOCALSTACK_HOST": address,
        "SQS_ENDPOINT_STRATEGY": "path",
        "DNS_ADDRESS": "0",
        "DISABLE_EVENTS": "1",
        "SKIP_SSL_CERT_DOWNLOAD": "1",
        "LOCALSTACK_VOLUME_DIR": str(volume),
        "SERVICES": "sqs,s3,events,cloudformation,iam,sts,ssm,secretsmanager,cloudwatch,sns",
    }


@asynccontextmanager
async def localstack(options: Options) -> AsyncIterator[None]:
    """Use the LocalStack at LOCALSTACK_ENDPOINT, one already on the port, or start one."""
    if options.localstack_endpoint or await healthy(options.endpoint):
        if not await healthy(options.endpoint):
            raise SystemExit(f"LOCALSTACK_ENDPOINT={options.endpoint} does not answer")
        log.info("using the LocalStack at %s", options.endpoint)
        yield
        return
    python = LOCALSTACK_PYTHON
    if not python.exists():
        raise SystemExit("LocalStack is not installed: run `make run` (it installs it)")
    volume = options.state / "localstack"
    volume.mkdir(parents=True, exist_ok=True)
    env = localstack_env(volume, options.localstack_port)
    async with child(
        [str(python), "-m", "localstack.runtime.main"], env, options, "localstack"
    ) as proc:
        with anyio.fail_after(120):
            while not await healthy(options.endpoint):
                if proc.returncode is not None:
                    raise SystemExit(
                        f"LocalStack exited; see {options.state / 'logs/localstack.log'}"
                    )
                await anyio.sleep(0.3)
        log.info("LocalStack is up at %s", options.endpoint)
        yield


@asynccontextmanager
async def child(
    command: list[str], env: dict[str, str], options: Options, name: str
) -> AsyncIterator[anyio.abc.Process]:
    """A child process logging to <state>/logs/<name>.log, stopped with SIGTERM then SIGKILL."""
    logs = options.state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.log").open("ab") as out:
        proc = await anyio.open_process(command, env=env, stdout=out, stderr=out, cwd=ROOT)
    try:
        yield proc
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with anyio.move_on_after(30):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            log.info("%s stopped (exit %s)", name, proc.returncode)
