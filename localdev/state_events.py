"""The ``CodeBuild Build State Change`` events the local backend puts, as CodeBuild would."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.builds import BuildRequest

from .build_records import BuildRecord


def _codebuild_time(iso_time: str | None) -> str | None:
    """CodeBuild's event time format, e.g. ``Sep 1, 2017 4:12:29 PM`` (UTC)."""
    if not iso_time:
        return None
    return datetime.fromisoformat(iso_time).astimezone(UTC).strftime("%b %d, %Y %I:%M:%S %p")


def state_event(request: BuildRequest, record: BuildRecord) -> dict[str, Any]:
    """The ``CodeBuild Build State Change`` event CodeBuild would put for ``record`` (the
    fields of AWS's sample event; the logs link is the local log as a ``file://`` URL)."""
    push = request.push
    arn = f"arn:aws:codebuild:{push.region}:{push.account}:build/{record.id}"
    final = record.status != "IN_PROGRESS"
    phases = [
        {
            "phase-type": p.name,
            "phase-status": p.status,
            "phase-context": [p.message] if p.message else [],
            **({"start-time": _codebuild_time(p.started_at)} if p.started_at else {}),
            **({"duration-in-seconds": round(p.duration)} if p.duration is not None else {}),
        }
        for p in record.phases
    ]
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "CodeBuild Build State Change",
        "source": "aws.codebuild",
        "account": push.account,
        "time": (record.ended_at or record.started_at),
        "region": push.region,
        "resources": [arn],
        "detail": {
            "build-status": record.status,
            "project-name": record.project,
            "build-id": arn,
            "additional-information": {
                "environment": {
                    "image": "branchbuild-local",
                    "type": "LOCAL",
                    "environment-variables": [
                        {"name": name, "value": value, "type": "PLAINTEXT"}
                        for name, value in request.environment.items()
                    ],
                },
                "build-complete": final,
                "initiator": "branchbuild",
                "build-start-time": _codebuild_time(record.started_at),
                "source": {"type": "S3", "location": f"{request.bucket}/{request.key}"},
                "source-version": request.commit,
                "logs": {"deep-link": Path(record.log).as_uri()},
                "phases": phases,
            },
            "current-phase": "COMPLETED"
            if final
            else (record.phases[-1].name if record.phases else "SUBMITTED"),
            "current-phase-context": "[]",
            "version": "1",
        },
    }
