"""Wire the service together and run it under one root task group until a signal stops it."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import anyio
import anyio.abc
from aiobotocore.config import AioConfig

from .aws import AccountClients, Clients, open_clients
from .badges import Badges
from .build_state import Outcomes
from .builds import BuildBackend, BuildRequest, CodeBuild, StartedBuild
from .errors import ConfigurationError
from .git import Git
from .health import Health, bound_port, serve_http
from .intake import Intake
from .job import Services, start_recorded
from .mergebuilds import MergeBuilds, with_merges
from .metrics import Metrics
from .notify import Notifier
from .pipelines import Pipelines, Watcher
from .pullrequests import PullRequests
from .queue import Leases, Queue
from .reconcile import Reconciler
from .records import Records
from .scheduler import Scheduler
from .settings import BuildBackend as BackendName
from .settings import Settings
from .storage import Storage
from .supersede import LocalStop, Supersede
from .worker import Worker, job_runner

log = logging.getLogger("branchbuild")

# SNS answers in milliseconds: short reads and few attempts keep a publish well inside the
# claim's lease (service.notify.LEASE_SECONDS).
NOTIFY_CONFIG = AioConfig(read_timeout=10, retries={"mode": "standard", "max_attempts": 3})

#: Makes a build backend other than CodeBuild, given the settings, the AWS clients, the task
#: group its builds run in and the stack that closes what it opens. Production has none: the
#: local backend, which runs a repository's buildspec on this host, is in the development
#: package (``localdev.service``), which the image does not contain.
BackendFactory = Callable[
    [Settings, Clients, anyio.abc.TaskGroup, AsyncExitStack], Awaitable[BuildBackend]
]


class App:
    """The running service; ``stopping`` may also be set by an embedding test."""

    def __init__(self, settings: Settings, *, backend: BackendFactory | None = None) -> None:
        """Raises:
        ConfigurationError: ``BRANCHBUILD_BUILD_BACKEND=local`` without a local backend.
        """
        if settings.build_backend is BackendName.LOCAL and backend is None:
            raise ConfigurationError(
                "BRANCHBUILD_BUILD_BACKEND=local is for development only (it runs the "
                "repository's buildspec commands on this host), and this service has no such "
                "backend: `python -m localdev.service` runs the service with it"
            )
        self.settings = settings
        self.backend_factory = backend
        self.metrics = Metrics()
        self.health = Health(liveness_timeout=settings.liveness_timeout)
        self.stopping = anyio.Event()
        self.http_port: int | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until SIGTERM/SIGINT (or ``stopping``), drain, and return.

        Raises:
            ConfigurationError: a setting is unusable (e.g. no SSH key file).
            AccessDenied, TransientError: a queue cannot be read at start-up.
        """
        s = self.settings
        git = Git(s, self.metrics)  # fails fast on a bad SSH set-up
        async with AsyncExitStack() as stack:
            clients = await open_clients(
                stack,
                max_pool=s.concurrency * (s.upload_concurrency + 1) + 10,
                on_retry=lambda service, n: self.metrics.aws_retries.labels(service=service).inc(n),
            )
            intake_queue = Queue(clients.sqs, s.queue_url, name="intake")
            work_queue = Queue(clients.sqs, s.work_queue_url, name="work")
            await intake_queue.describe()
            await work_queue.describe()
            storage = Storage(
                clients.s3,
                s.bucket,
                part_size=s.part_size,
                concurrency=s.upload_concurrency,
                max_bytes=s.max_archive_bytes,
                buffers=anyio.CapacityLimiter(s.max_parts_in_flight),
            )
            await storage.check()
            pipelines = Pipelines.from_settings(s)
            watcher = None
            if s.config is not None:
                watcher = Watcher(s, pipelines, self.metrics, clients.s3)
                await watcher.load()  # a bad file refuses to start (ConfigurationError)
            # A third of the visibility timeout between heartbeats: two may fail before a
            # held message is handed to another consumer.
            intake_leases = Leases(
                visibility=s.intake_visibility_timeout,
                interval=s.intake_visibility_timeout / 3,
                metrics=self.metrics,
            )
            work_leases = Leases(
                visibility=s.visibility_timeout,
                interval=s.visibility_timeout / 3,
                metrics=self.metrics,
            )
            runner = await stack.enter_async_context(
                serve_http(self.health, self.metrics, host=s.http_host, port=s.http_port)
            )
            self.http_port = bound_port(runner)
            # issue 13: build outcomes, superseding, pull request feedback
            records = Records(clients.s3, s.bucket, self.metrics)
            accounts = AccountClients(clients, stack, s.pull_request_role_template)
            badges = Badges(records, s, self.metrics)  # issue 25
            pull_requests = PullRequests(accounts, records, s, self.metrics, pipelines, badges)
            merges = MergeBuilds(accounts, records, s, self.metrics, pipelines, work_queue)
            codebuild = CodeBuild(clients.codebuild)
            scheduler = Scheduler(
                records,
                s,
                self.metrics,
                pipelines,
                work_queue,
                statuses=codebuild.statuses if s.build_backend is BackendName.CODEBUILD else None,
            )
            # issue 25: notifications (SNS), one client for the service's life
            sns = await stack.enter_async_context(
                clients.session.client("sns", config=clients.config.merge(NOTIFY_CONFIG))
            )
            notifier = Notifier(
                sns, records, s, self.metrics, pipelines, pull_requests=pull_requests.commented
            )
            work_queue.on_dead_letter = notifier.dead_lettered
            outcomes = Outcomes(
                records,
                s,
                self.metrics,
                listeners=(
                    pull_requests.changed,
                    scheduler.build_changed,
                    merges.changed,
                    notifier.changed,
                    badges.changed,
                ),
                pull_requests=with_merges(pull_requests.event, merges),
                retry_lookup=(
                    codebuild.retry_link if s.build_backend is BackendName.CODEBUILD else None
                ),
            )
            async with anyio.create_task_group() as background:
                backend = await self._backend(codebuild, clients, background, stack)
                if s.build_backend is BackendName.CODEBUILD:
                    supersede = Supersede(records, clients.codebuild, s, self.metrics, pipelines)
                else:  # the local backend stops its own builds
                    local = backend if isinstance(backend, LocalStop) else None
                    supersede = Supersede(records, None, s, self.metrics, pipelines, local=local)
                services = Services(
                    settings=s,
                    git=git,
                    storage=storage,
                    backend=backend,
                    backend_name=s.build_backend.value,
                    metrics=self.metrics,
                    pipelines=pipelines,
                    started_hooks=(
                        supersede.started,
                        pull_requests.started,
                        merges.started,
                        notifier.started,
                        badges.started,
                    ),
                    on_branch_deleted=supersede.branch_deleted,
                    scheduler=scheduler,
                    newer_started=supersede.newer_started,
                )
                intake = Intake(
                    intake_queue,
                    work_queue,
                    s,
                    self.metrics,
                    self.health,
                    intake_leases,
                    pipelines,
                    outcomes,
                    on_push=merges.pushed,
                )
                worker = Worker(
                    work_queue,
                    work_leases,
                    self.health,
                    settings=s,
                    metrics=self.metrics,
                    job=job_runner(services),
                )
                background.start_soon(self._watch_signals, name="signals")
                background.start_soon(intake_leases.run, name="intake heartbeat")

                async def start_waiting(request: BuildRequest) -> StartedBuild:
                    return await start_recorded(request, services)

                background.start_soon(
                    scheduler.run, self.stopping, start_waiting, name="dispatcher"
                )
                background.start_soon(work_leases.run, name="work heartbeat")
                if watcher is not None:
                    background.start_soon(watcher.run, self.stopping, name="config")
                    reconciler = Reconciler(s, pipelines, git, storage, work_queue, self.metrics)
                    background.start_soon(reconciler.run, self.stopping, name="reconcile")
                async with anyio.create_task_group() as consumers:
                    await consumers.start(intake.run, self.stopping)
                    await consumers.start(worker.run, self.stopping)
                    self.health.ready = True
                    log.info("consuming %s and %s", s.queue_url, s.work_queue_url)
                    task_status.started()
                background.cancel_scope.cancel()
        log.info("stopped")

    async def _backend(
        self,
        codebuild: CodeBuild,
        clients: Clients,
        background: anyio.abc.TaskGroup,
        stack: AsyncExitStack,
    ) -> BuildBackend:
        if self.backend_factory is not None:
            return await self.backend_factory(self.settings, clients, background, stack)
        return codebuild

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if not self.stopping.is_set():
                    log.info(
                        "%s: stopping; in-flight jobs get %s s",
                        signal.Signals(signum).name,
                        self.settings.shutdown_grace,
                    )
                    self.health.draining = True
                    self.stopping.set()
