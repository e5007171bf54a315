"""Branch deletion clean-up, for a rule with ``on_delete: delete`` (the default is ``keep``).

The deletion travels the work queue in the branch's own FIFO lane, so it runs after every
push of that branch queued before it, and a push still waiting is superseded by it. It deletes
every archive of the branch (any commit, as the rule's key template names them), their ledger
entries, and any multipart upload a killed job left open. Deleting is idempotent: a redelivered
deletion finds nothing and succeeds.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from .aws import translated
from .errors import StorageError
from .events import Push
from .pipelines import Rule
from .storage import Storage

if TYPE_CHECKING:
    from .job import Services

log = logging.getLogger("branchbuild.cleanup")


async def clean_up_branch(push: Push, rule: Rule, services: Services) -> int:
    """Delete the deleted branch's archives and ledger entries; returns how many objects.

    Raises:
        StorageError: S3 failed (transient; the deletion is retried).
    """
    from .job import branch_keys

    # The branch's running build is stopped first (service.supersede), while its ledger entry
    # still exists to record why.
    if services.on_branch_deleted is not None:
        await services.on_branch_deleted(push, rule)
    prefix, pattern = branch_keys(rule.key_template, push)
    if not prefix:  # a key template starting with {commit}: never list the whole bucket
        log.warning("%s: the key template has no branch prefix; nothing deleted", rule.name)
        return 0
    storage = services.storage
    await storage.abort_stale(prefix, pattern)
    keys = await _branch_objects(storage, prefix, pattern.pattern)
    for start in range(0, len(keys), 1000):
        batch = keys[start : start + 1000]
        with translated(
            f"delete objects under s3://{storage.bucket}/{prefix}", transient=StorageError
        ):
            reply = await storage.s3.delete_objects(
                Bucket=storage.bucket,
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
        if reply.get("Errors"):
            first = reply["Errors"][0]
            raise StorageError(f"could not delete {first.get('Key')}: {first.get('Code')}")
    log.info("deleted %s object(s) of %s %s", len(keys), push.repository, push.ref)
    return len(keys)


async def _branch_objects(storage: Storage, prefix: str, archive: str) -> list[str]:
    """Every archive of the branch and its ledger entry (``<key>.build.json``)."""
    wanted = re.compile(f"(?:{archive})(?:{re.escape(Storage.ledger_key(''))})?")
    keys: list[str] = []
    pages = storage.s3.get_paginator("list_objects_v2").paginate(
        Bucket=storage.bucket, Prefix=prefix
    )
    with translated(f"list s3://{storage.bucket}/{prefix}", transient=StorageError):
        async for page in pages:
            keys += [o["Key"] for o in page.get("Contents", []) if wanted.fullmatch(o["Key"])]
    return keys
