"""Secrets Manager references of a buildspec's ``env.secrets-manager``, read as CodeBuild does."""

from __future__ import annotations

import json
from typing import Any

from service.errors import PermanentError

from .buildspec import parse_secret_ref


async def read_secret(client: Any, reference: str) -> str:
    ref = parse_secret_ref(reference)
    arguments = {"SecretId": ref.secret_id}
    if ref.version_stage:
        arguments["VersionStage"] = ref.version_stage
    if ref.version_id:
        arguments["VersionId"] = ref.version_id
    reply = await client.get_secret_value(**arguments)
    text = reply.get("SecretString")
    if text is None:
        raise PermanentError(f"secret {ref.secret_id!r} holds binary data, not text")
    if not ref.json_key:
        return str(text)
    try:
        value = json.loads(text)[ref.json_key]
    except (ValueError, TypeError, KeyError):
        raise PermanentError(f"secret {ref.secret_id!r} has no JSON key {ref.json_key!r}") from None
    return value if isinstance(value, str) else json.dumps(value)
