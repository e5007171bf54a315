"""Branch deletion clean-up, for a rule with ``on_delete: delete`` (the default is ``keep``).

The deletion travels the work queue in the branch's own FIFO lane, so it runs after every
push of that branch queued before it, and a push still waiting is superseded by it. It deletes
every archive of the branch (any commit, as the rule's key template names them), their ledger
entries, and any multipart upload a killed job left open. Deleting is idempotent: a redelivered
deletion finds nothing and succeeds.

Only the branch's own objects go: the key template gives every branch its own keys
(:func:`service.settings.check_key_template`), and an archive whose ledger entry names
another ref (a tag of the same name under a ``{branch}`` template) is left where it is.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from .aws import translated
from .errors import StorageError
from .events import Push
from .ledger import LEDGER_SUFFIX, BranchKeys, Ledger, branch_keys
from .pipelines import Rule
from .storage import Storage

log = logging.getLogger("branchbuild.cleanup")

# Stops the deleted branch's running build first (service.supersede).
BranchDeleted = Callable[[Push, Rule], Awaitable[None]]


async def clean_up_branch(
    push: Push,
    rule: Rule,
    storage: Storage,
    ledger: Ledger,
    on_branch_deleted: BranchDeleted | None = None,
) -> int:
    """Delete the deleted branch's archives and ledger entries; returns how many objects.

    Raises:
        StorageError: S3 failed (transient; the deletion is retried).
    """
    # The branch's running build is stopped first, while its ledger entry still exists to
    # record why.
    if on_branch_deleted is not None:
        await on_branch_deleted(push, rule)
    keys = branch_keys(rule.key_template, push)
    if not keys.prefix:  # a key template starting with {commit}: never list the whole bucket
        log.warning("%s: the key template has no branch prefix; nothing deleted", rule.name)
        return 0
    await storage.abort_stale(keys)
    found = await _branch_objects(storage, keys)
    theirs = await _other_refs(found, push, ledger)
    doomed = [key for key in found if key.removesuffix(LEDGER_SUFFIX) not in theirs]
    for start in range(0, len(doomed), 1000):
        batch = doomed[start : start + 1000]
        with translated(
            f"delete objects under s3://{storage.bucket}/{keys.prefix}", transient=StorageError
        ):
            reply = await storage.s3.delete_objects(
                Bucket=storage.bucket,
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
        if reply.get("Errors"):
            first = reply["Errors"][0]
            raise StorageError(f"could not delete {first.get('Key')}: {first.get('Code')}")
    log.info("deleted %s object(s) of %s %s", len(doomed), push.repository, push.ref)
    return len(doomed)


async def _branch_objects(storage: Storage, keys: BranchKeys) -> list[str]:
    """Every archive of the branch and its ledger entry (``<key>.build.json``)."""
    found: list[str] = []
    paginator = storage.s3.get_paginator("list_objects_v2")
    with translated(f"list s3://{storage.bucket}/{keys.prefix}", transient=StorageError):
        async for page in paginator.paginate(Bucket=storage.bucket, Prefix=keys.prefix):
            found += [o["Key"] for o in page.get("Contents", []) if keys.owns(o["Key"])]
    return found


async def _other_refs(found: list[str], push: Push, ledger: Ledger) -> set[str]:
    """The archives among ``found`` whose ledger entry names another ref than the deleted
    one: under a ``{branch}`` template, a tag shares its keys with a branch of its name."""
    theirs: set[str] = set()
    for key in found:
        if key.endswith(LEDGER_SUFFIX):
            archive = key.removesuffix(LEDGER_SUFFIX)
            entry = await ledger.read(archive)
            if entry is not None and entry.ref != push.ref:
                log.warning("kept %s: its ledger entry names %s", archive, entry.ref)
                theirs.add(archive)
    return theirs
