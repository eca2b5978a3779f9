"""The keeper: a thread in every worker's main process that keeps the deployment's jobs moving when workers die.

Every ``heartbeat_interval_s`` it records the worker's heartbeat in Redis with the delivery tags of every message
the worker holds (prefetched, waiting for an ETA, or running). Every ``reconcile_interval_s`` one worker of the
deployment, whichever takes the turn first, runs a reconciler pass (:func:`worker.recovery.reconcile`): it
publishes again what workers that stopped beating had taken, jobs whose leases lapsed, and jobs whose messages
were lost. So a dead worker's jobs are recovered within minutes with no process but the workers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from db.redis_state import WorkerRegistry, connect
from worker.transport import create_celery, held_delivery_tags

log = logging.getLogger(__name__)

TURN_KEY = "routet2i:reconcile:turn"
"""Whoever sets it (for one interval) runs the reconciler pass of that interval."""

REDIS_TIMEOUT_S = 5.0


class Keeper:
    """Heartbeats and reconciler turns of one worker (``node``) consuming ``queues``."""

    def __init__(self, settings: Settings, *, node: str, queues: list[str], slots: int = 1) -> None:
        self.settings = settings
        self.node = node
        self.queues = queues
        self.slots = slots
        self.registry = WorkerRegistry(connect(settings.state_redis_url, timeout=REDIS_TIMEOUT_S))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="routet2i-keeper", daemon=True)
        self._broker: redis.Redis | None = None
        self._app: Celery | None = None
        self._sessions: sessionmaker[Session] | None = None

    def start(self) -> None:
        self.beat()  # live from the start: nothing it takes from now on can look orphaned
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and forget this worker: a worker that stops cleanly has returned its messages."""
        self._stop.set()
        self._thread.join(timeout=REDIS_TIMEOUT_S * 2)
        try:
            self.registry.forget([self.node])
        except redis.RedisError as exc:
            log.warning("worker not unregistered", extra={"node": self.node, "error": str(exc)})

    def beat(self) -> None:
        self.registry.beat(self.node, pid=os.getpid(), queues=self.queues, held=held_delivery_tags(), slots=self.slots)

    def _run(self) -> None:
        interval = self.settings.heartbeat_interval_s
        next_pass = time.monotonic() + self.settings.reconcile_interval_s
        while not self._stop.wait(interval):
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat not recorded", extra={"node": self.node, "error": str(exc)})
                continue
            if self.settings.reconcile_in_workers and time.monotonic() >= next_pass:
                next_pass = time.monotonic() + self.settings.reconcile_interval_s
                self._take_turn()

    def _take_turn(self) -> None:
        """Run the deployment's reconciler pass if no other worker ran it this interval."""
        try:
            ttl_ms = max(1, int(self.settings.reconcile_interval_s * 900))  # a little under one interval
            if not self.registry.client.set(TURN_KEY, self.node, nx=True, px=ttl_ms):
                return
            from worker.recovery import reconcile

            report = reconcile(
                self._db(), self._publisher(), self._broker_client(), self.settings, registry=self.registry
            )
            log.debug("reconciler pass", extra={"node": self.node, **report.to_dict()})
        except Exception:  # the next turn tries again
            log.exception("reconciler pass failed", extra={"node": self.node})

    # Built on first use, never before the pool forks. The engine opens a connection per use (NullPool), so
    # no database connection is open in this process when it forks a pool process.

    def _db(self) -> sessionmaker[Session]:
        if self._sessions is None:
            from sqlalchemy.pool import NullPool

            from db.session import make_engine, make_session_factory

            self._sessions = make_session_factory(make_engine(self.settings.database_url, poolclass=NullPool))
        return self._sessions

    def _publisher(self) -> Celery:
        if self._app is None:
            self._app = create_celery(self.settings)
        return self._app

    def _broker_client(self) -> redis.Redis:
        if self._broker is None:
            self._broker = connect(self.settings.broker_url, timeout=REDIS_TIMEOUT_S)
        return self._broker


def start_keeper(app: Celery, consumer: Any) -> Keeper:
    """The keeper of the worker whose consumer is ``consumer`` (called when the worker is ready)."""
    controller = getattr(consumer, "controller", None)
    keeper = Keeper(
        app.conf.routet2i_settings,
        node=consumer.hostname,
        queues=list(app.conf.get("routet2i_warm_queues") or []),
        slots=int(getattr(controller, "concurrency", None) or 1),
    )
    keeper.start()
    return keeper
