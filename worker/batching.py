"""Dynamic batching of Celery messages: one pool call runs every message that is waiting, up to a limit.

A batching task's messages are not handed to the pool one by one. The worker's consumer keeps them, and
whenever a pool process is free it gives that process every message waiting (up to ``max_batch`` jobs; a
message may carry several job ids) as one call. Nothing ever waits for a batch to fill: a message that finds
a free process runs at once, alone, so an idle system answers as fast as without batching; under load the
messages that arrived while the pool was busy run together, and the work that does not depend on the number
of jobs (a transaction, a round trip to Redis, an encoder pass, a diffusion call) is paid once per batch
instead of once per job.

Delivery guarantees are the ones of a plain late-acknowledged task, per message:

* every message of a batch is acknowledged only after the pool call for its batch returned;
* when the pool process dies during the call (killed, out of memory), every message of its batch is
  rejected back onto its queue (``task_reject_on_worker_lost``), so each job is redelivered;
* a message with an ETA (a retry's countdown) waits in the consumer's timer and then joins the next batch;
* messages held by the consumer are unacknowledged, like prefetched ones: a warm shutdown returns them to
  the queue, a lost worker's are redelivered after the broker's visibility timeout.

The consumer can only collect messages it is allowed to prefetch, so batches of many messages need a prefetch
count of that many per process (:func:`worker.tasks.prefetch_multiplier` sets it per queue). The ``solo`` pool
runs each call inline in the consumer, so it never forms a batch of more than one message.

This is a worker *strategy* (the hook Celery offers for how a task's messages are executed), the same kind
of extension as the ``celery-batches`` package, which flushes on a timer instead and so delays every message
of an idle system by its flush interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import Celery, Task, signals
from celery.utils.imports import symbol_by_name
from celery.utils.time import timezone
from celery.worker import state as worker_state
from celery.worker.request import create_request_cls
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2
from kombu.asynchronous.timer import to_timestamp

from core.logs import log_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """One message of a batch, as the pool process sees it.

    Attributes:
        id: the Celery task id (a retry or a redelivery keeps it).
        args: the message's positional arguments: the ids of the jobs it carries.
        kwargs: its keyword arguments.
        retries: how many times the message was retried so far.
    """

    id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retries: int


class BatchTask(Task):
    """Base of tasks whose messages run in batches; the task function receives ``list[Delivery]``.

    Set ``max_batch`` when registering (``@app.task(base=BatchTask, max_batch=32)``). The function must
    settle every job of every delivery itself (finish it, fail it, or send a retry with
    :meth:`retry_delivery`): returning acknowledges the whole batch.
    """

    abstract = True
    max_batch: int = 1
    """Most jobs in one pool call (a message carrying more runs alone)."""

    def retry_delivery(self, delivery: Delivery, *, countdown: float, args: Sequence[Any] | None = None) -> None:
        """Publish ``delivery`` again after ``countdown`` seconds, with its retry count increased, as
        ``Task.retry`` does for a plain task (same task id, same queue); ``args``: only these of its jobs."""
        self.app.send_task(
            self.name,
            args=list(delivery.args if args is None else args),
            kwargs=delivery.kwargs,
            task_id=delivery.id,
            retries=delivery.retries + 1,
            countdown=countdown,
            queue=self.app.conf.task_routes[self.name]["queue"],
        )

    def Strategy(self, task: BatchTask, app: Celery, consumer: Any) -> Callable[..., None]:
        """The consumer side: turn each message into a request and give it to the :class:`_Batcher`."""
        Request = create_request_cls(
            symbol_by_name(task.Request), task, consumer.pool, consumer.hostname, consumer.event_dispatcher, app=app
        )
        batcher = _Batcher(task, consumer)
        revoked = consumer.controller.state.revoked
        to_system_tz = timezone.to_system

        def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **_: Any) -> None:
            if body is None and "args" not in message.payload:
                body, headers, decoded, utc = message.body, message.headers, False, app.uses_utc_timezone()
            elif "args" in message.payload:
                body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
            else:
                body, headers, decoded, utc = proto1_to_proto2(message, body)
            request = Request(
                message,
                on_ack=ack,
                on_reject=reject,
                app=app,
                hostname=consumer.hostname,
                eventer=consumer.event_dispatcher,
                task=task,
                connection_errors=consumer.connection_errors,
                body=body,
                headers=headers,
                decoded=decoded,
                utc=utc,
            )
            if (request.expires or request.id in revoked) and request.revoked():
                return
            signals.task_received.send(sender=consumer, request=request)
            if request.eta:
                try:
                    eta = to_timestamp(to_system_tz(request.eta) if request.utc else request.eta)
                except (OverflowError, ValueError):
                    log.exception("message with an unreadable ETA dropped", extra={"task_id": request.id})
                    request.reject(requeue=False)
                    return
                # Held in the timer, the message still counts against the prefetch limit: raise the limit.
                consumer.qos.increment_eventually()
                worker_state.task_scheduled(request)
                consumer.timer.call_at(eta, batcher.add_due, (request,), priority=6)
                return
            worker_state.task_reserved(request)
            batcher.add(request)

        return on_message


class _Batcher:
    """Holds a task's waiting requests and starts a batch whenever the pool has a free process."""

    def __init__(self, task: BatchTask, consumer: Any) -> None:
        self.task = task
        self.consumer = consumer  # its QoS is built after the strategies: read it when it is needed
        self.pool = consumer.pool
        self.waiting: deque[Any] = deque()
        self.running = 0
        # The threads pool calls back from its own threads; the prefork pool from the consumer's event loop.
        self.lock = threading.RLock()

    def add(self, request: Any) -> None:
        with self.lock:
            self.waiting.append(request)
            self._start()

    def add_due(self, request: Any) -> None:
        """A request whose ETA has passed (called by the consumer's timer)."""
        worker_state.task_reserved(request)
        self.consumer.qos.decrement_eventually()
        self.add(request)

    def _start(self) -> None:
        limit = max(1, int(getattr(self.pool, "limit", 1) or 1))
        while self.waiting and self.running < limit:
            batch = [self.waiting.popleft()]
            jobs = len(batch[0].args)
            while self.waiting and jobs + len(self.waiting[0].args) <= self.task.max_batch:
                jobs += len(self.waiting[0].args)
                batch.append(self.waiting.popleft())
            deliveries = [
                Delivery(r.id, tuple(r.args), dict(r.kwargs), int(r.request_dict.get("retries") or 0)) for r in batch
            ]
            self.running += 1
            self.pool.apply_async(
                run_batch,
                args=(self.task.name, deliveries),
                accept_callback=lambda pid, at, batch=batch: self._accepted(batch, pid, at),
                callback=lambda _result, batch=batch: self._finished(batch),
                error_callback=lambda info, batch=batch: self._failed(batch, info),
            )

    def _accepted(self, batch: Sequence[Any], pid: int, time_accepted: float) -> None:
        for request in batch:
            request.on_accepted(pid, time_accepted)

    def _finished(self, batch: Sequence[Any]) -> None:
        for request in batch:
            request.acknowledge()
            worker_state.task_ready(request)
        self._done()

    def _failed(self, batch: Sequence[Any], info: Any) -> None:
        exc = getattr(info, "exception", info)
        if isinstance(exc, ExceptionWithTraceback):  # how billiard carries exceptions across processes
            exc = exc.exc
        lost = isinstance(exc, WorkerLostError)
        log.error(
            "batch %s: %s",
            "lost with its pool process; messages requeued" if lost else "failed outside its task",
            exc,
            extra={"task": self.task.name, "batch": len(batch)},
        )
        for request in batch:
            if lost and self.task.reject_on_worker_lost:
                request.reject(requeue=True)
            else:
                request.acknowledge()
            worker_state.task_ready(request)
        self._done()

    def _done(self) -> None:
        with self.lock:
            self.running -= 1
            self._start()


_TASKS: dict[str, BatchTask] = {}
"""Batch tasks by name, registered in the worker's main process before its pool starts (forked pool
processes inherit them; the threads pool shares them)."""


def register(task: BatchTask) -> BatchTask:
    """Make ``task`` runnable by :func:`run_batch` in this process and in pool processes forked from it."""
    _TASKS[task.name] = task
    return task


def run_batch(task_name: str, deliveries: list[Delivery]) -> int:
    """The pool side: run the batch task on ``deliveries``.

    The task function settles every delivery; an exception that escapes it is a defect: it is logged and the
    batch is acknowledged like a plain late-acknowledged task that raised, and the reconciler takes care of
    jobs left unfinished.
    """
    task = _TASKS[task_name]
    jobs = sum(len(d.args) for d in deliveries)
    started = time.perf_counter()
    with log_context(task=task_name):  # every record of the batch says which task it belongs to
        try:
            task.run(deliveries)
        except Exception:
            log.exception("batch task raised", extra={"messages": len(deliveries), "jobs": jobs})
        else:
            log.info(
                "batch finished",
                extra={"messages": len(deliveries), "jobs": jobs, "runtime_s": round(time.perf_counter() - started, 4)},
            )
    return len(deliveries)
