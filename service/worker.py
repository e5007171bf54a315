"""The work stage: concurrent jobs, one lane per branch, newest push wins.

* A receive happens only when a job slot is free and no received job is still waiting for one
  (limits before work); it asks for 10 messages so that several waiting pushes of one branch
  arrive together and all but the newest are acknowledged as superseded.
* Every held message is heartbeated (:class:`service.queue.Leases`) until it is settled.
* A message is deleted only after its job succeeded or was deliberately skipped. A failure
  makes it visible again (at once for a permanent error, after a backoff for a transient
  one); on its last allowed receive it is dead-lettered with its reason.
* No failure of an SQS call ends the loop or a job task: it is logged and counted, and the
  message's visibility timeout brings it back.
* Messages are received with a short visibility (``BRANCHBUILD_VISIBILITY_TIMEOUT``) and held
  from their receive: a slow job keeps its message, a dead instance's comes back in seconds.
* On stop: no new receive; the one under way is let finish and its messages run if a slot is
  free; running jobs get ``shutdown_grace`` seconds, then the rest are cancelled and released
  (visibility 0) so another instance takes them at once.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from .errors import BranchbuildError, PermanentError, TransientError, unexpected
from .events import Push, parse_work
from .health import Health
from .job import JobResult, Services, run_job
from .logs import bind
from .metrics import Metrics
from .outcome import Outcome
from .queue import Deleter, Leases, Message, Queue, consume
from .settings import Settings

log = logging.getLogger("branchbuild.worker")

_POISON_MEMORY = 1024
# Longest receive wait while jobs are running (seconds); see Worker.run.
_BUSY_WAIT = 1


#: Runs one push's job (``recovering``: its branch had a message received before); in the
#: service :func:`service.job.run_job` with the shared services, in tests a stub.
JobRunner = Callable[[Push, bool], Awaitable[JobResult]]


def job_runner(services: Services) -> JobRunner:
    async def run(push: Push, recovering: bool) -> JobResult:
        return await run_job(push, services, recovering=recovering)

    return run


class Worker:
    def __init__(
        self,
        queue: Queue,
        leases: Leases,
        health: Health,
        *,
        settings: Settings,
        metrics: Metrics,
        job: JobRunner,
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.metrics = metrics
        self.job = job
        self.leases = leases
        self.health = health
        self._slots = anyio.CapacityLimiter(self.settings.concurrency)
        self._active = 0  # received and not yet settled
        self._changed = anyio.Event()
        # Message ids that failed permanently: a redelivery is released without redoing work.
        self._poison: OrderedDict[str, PermanentError] = OrderedDict()
        self._waiting: set[anyio.CancelScope] = set()
        self._draining = False
        self._deleter = Deleter(queue)

    async def run(
        self,
        stopping: anyio.Event,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume until ``stopping`` is set, then drain within the grace period."""
        self.health.beat("worker")
        async with anyio.create_task_group() as jobs:
            task_status.started()
            batches = consume(
                self.queue,
                stopping,
                visibility=self.settings.visibility_timeout,
                wait=self._wait_time,
                health=self.health,
                metrics=self.metrics,
                loop="worker",
            )
            async for messages in batches:
                for newest, recovering in await self._supersede(messages):
                    self._active += 1
                    self.metrics.in_flight.inc()
                    jobs.start_soon(self._run, newest, recovering, name=f"job {newest.id}")
                await self._wait_for_capacity(stopping)
            self._draining = True
            self.health.draining = True
            for waiting in list(self._waiting):
                waiting.cancel()
            if self._active:
                log.info(
                    "draining %s job(s) for up to %s s", self._active, self.settings.shutdown_grace
                )
            jobs.cancel_scope.deadline = anyio.current_time() + self.settings.shutdown_grace
        log.info("worker stopped")

    def _wait_time(self) -> int:
        # While jobs run, poll briefly: a finished job unlocks its branch's FIFO group, and a
        # long poll that is already waiting does not see that group's next message on every
        # SQS implementation (moto's doesn't: with as many jobs as branches, the next pushes
        # waited out the whole 20 s). Idle, the service long-polls for BRANCHBUILD_WAIT_TIME.
        if self._active:
            return min(self.settings.wait_time, _BUSY_WAIT)
        return self.settings.wait_time

    async def _wait_for_capacity(self, stopping: anyio.Event) -> None:
        """Wait for a free slot (and no job still waiting for one), or for ``stopping``."""
        while self._active >= self.settings.concurrency and not stopping.is_set():
            self._changed = anyio.Event()
            with anyio.move_on_after(self.settings.liveness_timeout / 3):
                async with anyio.create_task_group() as tg:

                    async def until(event: anyio.Event) -> None:
                        await event.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(until, self._changed)
                    tg.start_soon(until, stopping)
            self.health.beat("worker")

    async def _supersede(self, messages: list[Message]) -> list[tuple[Message, bool]]:
        """Keep the newest message of each branch's group; acknowledge the older ones.

        With each newest message: whether its branch had a message received before (a
        redelivery), so its job first cleans up after a possibly killed attempt.
        """
        newest: dict[str, Message] = {}
        older: list[Message] = []
        redelivered: set[str] = set()
        for message in messages:  # FIFO order within a group: later is newer
            if message.group in newest:
                older.append(newest[message.group])
            newest[message.group] = message
            if message.receive_count > 1:
                redelivered.add(message.group)
        self.leases.hold(self.queue, list(newest.values()))
        if older:
            self.metrics.jobs.labels(outcome=Outcome.SUPERSEDED.value).inc(len(older))
            for message in older:
                log.info(
                    "superseded by a newer push of the same branch",
                    extra={"message_id": message.id},
                )
            await self._acknowledge(older, "superseded")
        return [(message, group in redelivered) for group, message in newest.items()]

    async def _acknowledge(self, messages: list[Message], why: str) -> None:
        """Delete settled messages, in batches shared with other jobs finishing at the same
        time. A failure is logged, never raised: the message comes back after its visibility
        timeout and the ledger (or supersede) makes that a no-op."""
        with anyio.CancelScope(shield=True):
            failed = await self._deleter.delete(messages)
        if failed:
            log.warning("could not delete %s message(s) (%s)", len(failed), why)
            self.metrics.errors.labels(kind="delete").inc(len(failed))

    async def _run(self, message: Message, recovering: bool) -> None:
        bind(message_id=message.id)
        try:
            if not await self._take_slot():  # stopping: never started, hand it back at once
                await self._release(message, "not started before shutdown")
                return
            try:
                await self._process(message, recovering)
            finally:
                self._slots.release()
        except anyio.get_cancelled_exc_class():
            await self._release(message, "cancelled at the end of the shutdown grace")
            raise
        finally:
            self.leases.drop([message])
            self._active -= 1
            self.metrics.in_flight.dec()
            self._changed.set()

    async def _take_slot(self) -> bool:
        """Take a job slot; False when the service stops before one is free."""
        if self._draining:  # a message of the last receive: run it only if a slot is free
            try:
                self._slots.acquire_nowait()
            except anyio.WouldBlock:
                return False
            return True
        with anyio.CancelScope() as waiting:
            self._waiting.add(waiting)
            try:
                await self._slots.acquire()
            finally:
                self._waiting.discard(waiting)
        return not waiting.cancelled_caught

    async def _release(self, message: Message, why: str) -> None:
        self.leases.drop([message])
        with anyio.CancelScope(shield=True):
            try:
                await self.queue.change_visibility([message], 0)
            except BranchbuildError as exc:
                log.warning("could not release the message: %s", exc)
        self.metrics.jobs.labels(outcome=Outcome.RELEASED.value).inc()
        log.warning("job %s; message released", why)

    async def _process(self, message: Message, recovering: bool) -> None:
        if message.id in self._poison:
            await self._fail(message, self._poison[message.id])
            return
        if message.sent_at_ms:  # the "receive" stage: time spent waiting in the work queue
            waited = max(0.0, time.time() - message.sent_at_ms / 1000)
            self.metrics.stage_seconds.labels(stage="receive").observe(waited)
        try:
            push = parse_work(message.body)
            bind(
                event_id=push.event_id,
                repository=push.repository,
                branch=push.name,
                commit=push.commit,
            )
            with anyio.fail_after(self.settings.job_timeout):
                result = await self.job(push, recovering)
        except BranchbuildError as exc:
            await self._fail(message, exc)
        except TimeoutError:
            error = TransientError(
                f"job exceeded BRANCHBUILD_JOB_TIMEOUT={self.settings.job_timeout:g} s"
            )
            await self._fail(message, error)
        except Exception as exc:  # a bug: never let it kill the loop, retry like a transient
            log.exception("unexpected error in job")
            await self._fail(message, unexpected(exc))
        else:
            self.metrics.jobs.labels(outcome=result.outcome.value).inc()
            await self._acknowledge([message], "the job is done")

    async def _fail(self, message: Message, error: BranchbuildError) -> None:
        if isinstance(error, PermanentError):
            self._poison[message.id] = error
            while len(self._poison) > _POISON_MEMORY:
                self._poison.popitem(last=False)
        self.leases.drop([message])
        self.metrics.errors.labels(kind=error.kind).inc()
        s = self.settings
        outcome = await self.queue.fail(
            message, error, base=s.retry_base_delay, cap=s.retry_max_delay
        )
        self.metrics.jobs.labels(outcome=outcome.value).inc()
        log.error(
            "job failed (%s, receive %s): %s; %s",
            error.kind,
            message.receive_count,
            error,
            outcome.value,
        )
