"""B: ``python -m service run`` as a real child process, configured only through BRANCHBUILD_*."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from .infra import PYTHON, ROOT, GitHostProcess, Queues, free_port, terminate, wait_until


class Service:
    def __init__(
        self,
        *,
        aws_env: dict[str, str],
        queues: Queues,
        bucket: str,
        host: GitHostProcess,
        cache_dir: Path,
        tmp_dir: Path,
        log: Path,
        overrides: dict[str, str],
    ) -> None:
        self.port = free_port()
        self.queues = queues
        self.bucket = bucket
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.env = (
            aws_env
            | {
                "BRANCHBUILD_QUEUE_URL": queues.intake,
                "BRANCHBUILD_WORK_QUEUE_URL": queues.work,
                "BRANCHBUILD_BUCKET": bucket,
                "BRANCHBUILD_GIT_URL_TEMPLATE": host.url_template,
                "BRANCHBUILD_SSH_KEY_FILE": str(host.key),
                "BRANCHBUILD_KNOWN_HOSTS_FILE": str(host.known_hosts),
                "BRANCHBUILD_CACHE_DIR": str(cache_dir),
                "BRANCHBUILD_HTTP_HOST": "127.0.0.1",
                "BRANCHBUILD_HTTP_PORT": str(self.port),
                "BRANCHBUILD_LOG_FORMAT": "json",
                "BRANCHBUILD_LOG_LEVEL": "WARNING",
                "TMPDIR": str(tmp_dir),  # sampled: it must stay empty (the archive is streamed)
            }
            | overrides
        )
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [PYTHON, "-m", "service", "run"],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._ready, within=60, what="service readiness")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"service exited {self.process.returncode}: {self.log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as ``name{labels}`` -> value."""
        return scrape(self.port)

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, within=60)


def scrape(port: int) -> dict[str, float]:
    """Every sample of the service's /metrics on ``port`` as ``name{labels}`` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            samples[series] = float(value)
    return samples


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for series, value in samples.items():
        metric_name, _, rest = series.partition("{")
        if metric_name != name:
            continue
        present = set(rest.rstrip("}").split(",")) if rest else set()
        if {f'{k}="{v}"' for k, v in labels.items()} <= present:
            total += value
    return total
