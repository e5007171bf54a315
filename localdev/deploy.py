"""``deploy/pipeline.yaml`` deployed into LocalStack, as the README's walkthrough deploys it."""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

if TYPE_CHECKING:
    from types_aiobotocore_cloudformation.type_defs import ParameterTypeDef

from .options import ACCOUNT, ROOT, Options, local_session

log = logging.getLogger("branchbuild.localdev")


# -- the stack --------------------------------------------------------------------------------


async def deploy(options: Options) -> dict[str, str]:
    """Create or update the pipeline stack from deploy/pipeline.yaml; return its outputs."""
    template = (ROOT / "deploy" / "pipeline.yaml").read_text()
    arns = ",".join(
        f"arn:aws:codecommit:{options.region}:{ACCOUNT}:{r}" for r in options.repositories
    )
    parameters: list[ParameterTypeDef] = [
        {"ParameterKey": "RepositoryArns", "ParameterValue": arns},
        {
            "ParameterKey": "ArtifactBucketName",
            "ParameterValue": f"{options.prefix}-local-artifacts",
        },
        {"ParameterKey": "Prefix", "ParameterValue": options.prefix},
    ]
    # LocalStack reports updates of the rule and the bucket as done without applying them,
    # so a changed template or parameter set means a fresh stack; the digest tells.
    digest = hashlib.sha256((template + json.dumps(parameters)).encode()).hexdigest()[:16]
    session = local_session(options)
    async with AsyncExitStack() as clients:
        cf = await clients.enter_async_context(
            session.client("cloudformation", endpoint_url=options.endpoint)
        )
        s3 = await clients.enter_async_context(session.client("s3", endpoint_url=options.endpoint))
        try:
            stacks = (await cf.describe_stacks(StackName=options.stack))["Stacks"]
        except cf.exceptions.ClientError:
            stacks = []
        if stacks:
            stack = stacks[0]
            tags = {t["Key"]: t["Value"] for t in stack.get("Tags", [])}
            if stack["StackStatus"] in _DONE and tags.get(_DIGEST_TAG) == digest:
                log.info("stack %s is up to date", options.stack)
                return _outputs(stack)
            log.info("replacing stack %s (template or parameters changed)", options.stack)
            bucket = _outputs(stack).get("BucketName")
            if bucket:
                await _empty_bucket(s3, bucket)
            await cf.delete_stack(StackName=options.stack)
            await _wait_stack(cf, options.stack, gone=True)
        log.info("deploying deploy/pipeline.yaml as stack %s", options.stack)
        await cf.create_stack(
            StackName=options.stack,
            TemplateBody=template,
            Parameters=parameters,
            Tags=[{"Key": _DIGEST_TAG, "Value": digest}],
        )
        return _outputs(await _wait_stack(cf, options.stack))


_DONE = {"CREATE_COMPLETE", "UPDATE_COMPLETE"}
_DIGEST_TAG = "branchbuild:deployed-digest"


def _outputs(stack: Any) -> dict[str, str]:
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


async def _empty_bucket(s3: Any, bucket: str) -> None:
    try:
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                await s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    except s3.exceptions.NoSuchBucket:
        return


async def _wait_stack(cf: Any, name: str, *, gone: bool = False) -> dict[str, Any]:
    with anyio.fail_after(180):
        while True:
            try:
                stack: dict[str, Any] = (await cf.describe_stacks(StackName=name))["Stacks"][0]
            except cf.exceptions.ClientError:
                if gone:
                    return {}
                raise
            status = stack["StackStatus"]
            if not status.endswith("IN_PROGRESS"):
                if gone and status == "DELETE_COMPLETE":
                    return {}
                if not gone and status not in _DONE:
                    raise SystemExit(f"stack {name} is {status}: {stack.get('StackStatusReason')}")
                return stack
            await anyio.sleep(0.5)
