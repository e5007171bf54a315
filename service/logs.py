"""Logging: one JSON object per line (CloudWatch) or readable text (a terminal)."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from .settings import LogFormat

_CONTEXT = ("message_id", "event_id", "repository", "branch", "commit", "build_id")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{k}={getattr(record, k)}" for k in _CONTEXT if hasattr(record, k)]
        return f"{line} [{' '.join(extras)}]" if extras else line


def configure(level: str, fmt: LogFormat) -> None:
    if fmt is LogFormat.AUTO:
        fmt = LogFormat.TEXT if sys.stderr.isatty() else LogFormat.JSON
    handler = logging.StreamHandler(sys.stderr)
    if fmt is LogFormat.JSON:
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "aiobotocore", "aioboto3", "asyncssh"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
