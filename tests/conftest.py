"""Shared fixtures: a real PostgreSQL database, a real Redis database, real Celery worker processes.

Isolation between several test runs on one machine: the PostgreSQL database name and the Redis database
index come from ``ROUTET2I_TEST_PG_DB`` (default ``routet2i_test``) and ``ROUTET2I_TEST_REDIS_DB``
(default 15). The services themselves are never mocked; if one is down the tests fail with a message that
says how to start it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis as redis_lib
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from core.settings import Settings
from tests.support import WorkerPool

PG_HOST = os.environ.get("ROUTET2I_TEST_PG_HOST", "127.0.0.1:5432")
PG_ADMIN_URL = os.environ.get("ROUTET2I_TEST_PG_ADMIN_URL", f"postgresql+psycopg://root@{PG_HOST}/postgres")
PG_DB = os.environ.get("ROUTET2I_TEST_PG_DB", "routet2i_test")
REDIS_DB = int(os.environ.get("ROUTET2I_TEST_REDIS_DB", "15"))
REDIS_URL = os.environ.get("ROUTET2I_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{REDIS_DB}")


def _pg_url(database: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + database


@contextmanager
def fresh_database(name: str) -> Iterator[str]:
    """A freshly created, migrated PostgreSQL database ``name``, dropped afterwards; yields its URL."""
    from db.migrate import upgrade

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - environment problem, reported loudly
        pytest.exit(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({exc}); start it, e.g. "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
            returncode=3,
        )
    url = _pg_url(name)
    upgrade(url)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A freshly created, migrated PostgreSQL database for this test session."""
    with fresh_database(PG_DB) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis_lib.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis_lib.exceptions.RedisError as exc:  # pragma: no cover
        pytest.exit(
            f"Redis is not reachable at {REDIS_URL} ({exc}); start it, e.g. "
            "redis-server --daemonize yes --save '' --appendonly no",
            returncode=3,
        )
    return REDIS_URL


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[redis_lib.Redis]:
    """The test Redis database, flushed before and after the test."""
    client = redis_lib.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


def make_settings(
    *, database_url: str, broker_url: str, image_dir: Path, cache_dir: Path, **overrides: object
) -> Settings:
    """Settings for tests: the offline models at the smallest size and step count that still run them."""
    tier = {"steps": 2, "width": 64, "height": 64}
    values: dict[str, object] = {
        "database_url": database_url,
        "broker_url": broker_url,
        "image_dir": image_dir,
        "cache_dir": cache_dir,
        "edge": {"model": "offline:edge", **tier},
        "cloud": {"model": "offline:cloud", **tier},
        "budget_name": "test",
        "torch_threads": 1,
        # Tests run their reconciler passes themselves (the session's workers would take the turns otherwise,
        # with every test's jobs in the shared database); the fault tests of recovery switch it back on.
        "reconcile_in_workers": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pg_settings(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Settings:
    return make_settings(
        database_url=pg_url,
        broker_url=redis_url,
        image_dir=tmp_path_factory.mktemp("images"),
        cache_dir=model_cache,
    )


@pytest.fixture()
def db_session(pg_url: str) -> Iterator[Session]:
    """A session inside an outer transaction that is rolled back at the end of the test."""
    engine = create_engine(pg_url)
    connection = engine.connect()
    outer = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    yield session
    session.close()
    outer.rollback()
    connection.close()
    engine.dispose()


def create_tenant_key(settings: Settings, name: str | None = None, **options: object) -> str:
    """Create a tenant (a unique name unless given) in the settings' database and return an API key for it."""
    import uuid

    from db.session import make_engine, make_session_factory, transaction
    from db.tenants import create_tenant, issue_api_key

    engine = make_engine(settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            tenant = create_tenant(session, name=name or f"t-{uuid.uuid4().hex[:10]}", **options)  # type: ignore[arg-type]
            return issue_api_key(session, tenant=tenant)
    finally:
        engine.dispose()


def authorize(client, key: str):  # type: ignore[no-untyped-def]
    """Make every request of a Flask test client carry ``key``."""
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client


@pytest.fixture(scope="session")
def stack(pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    """One real Celery worker process per queue (route, edge, cloud) on the test Redis and PostgreSQL."""
    client = redis_lib.Redis.from_url(pg_settings.broker_url)
    client.flushdb()
    pool = WorkerPool(pg_settings, log_dir=tmp_path_factory.mktemp("worker-logs"))
    try:
        pool.start_all()
        yield pool
    finally:
        pool.stop_all()
        client.flushdb()
