"""``python -m localdev.service``: the service with the local build backend (development only).

The same service as ``branchbuild run``, but ``BRANCHBUILD_BUILD_BACKEND=local`` gets a backend
that runs the repository's buildspec on this host (:mod:`localdev.builder`). The production
package cannot select it: it lives here, and the image does not contain this package.
"""

from __future__ import annotations

import logging
import sys
from contextlib import AsyncExitStack

import aioboto3
import anyio
import anyio.abc

from localdev.builder import LocalBuilds
from service.app import App
from service.aws import Clients, region
from service.builds import BuildBackend
from service.cli import serve
from service.settings import Settings

log = logging.getLogger("branchbuild")


async def local_backend(
    settings: Settings, clients: Clients, background: anyio.abc.TaskGroup, stack: AsyncExitStack
) -> BuildBackend:
    log.warning(
        "BRANCHBUILD_BUILD_BACKEND=local: buildspec commands run on this machine (development only)"
    )
    # Its state events go to the default bus as CodeBuild's would; through a session of its
    # own: the service's watched calls (IAM) are production's only.
    events = await stack.enter_async_context(
        aioboto3.Session(region_name=region()).client("events", config=clients.config)
    )
    return LocalBuilds(
        clients.s3,
        root=settings.builds_dir,
        timeout=settings.local_build_timeout,
        task_group=background,
        events=events,
    )


def main() -> int:
    return serve(lambda settings: App(settings, backend=local_backend))


if __name__ == "__main__":
    sys.exit(main())
