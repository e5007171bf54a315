"""Logging: one JSON object per line (CloudWatch) or readable text (a terminal)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType

from pythonjsonlogger.json import JsonFormatter

from .settings import LogFormat

_CONTEXT = ("message_id", "event_id", "repository", "branch", "commit", "build_id")
# An immutable default: bind() always sets a new dict, never mutates the shared one.
_bound: ContextVar[Mapping[str, str]] = ContextVar(
    "branchbuild_log_context", default=MappingProxyType({})
)


def bind(**fields: str | None) -> None:
    """Add fields to every later log line of the current task (each job runs in its own task,
    and tasks copy their context, so one job's fields never reach another's lines)."""
    _bound.set({**_bound.get(), **{k: v for k, v in fields.items() if v}})


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _bound.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


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
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "aiobotocore", "aioboto3", "asyncssh"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
