"""Alembic migrations run forward and back on both supported databases, and match the models."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from db.migrate import current_revision, downgrade, head_revision, upgrade
from db.models import Base

TABLES = {"jobs", "job_events", "decisions", "generations", "cost_entries"}


def assert_matches_models(url: str) -> None:
    engine = create_engine(url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"


def test_sqlite_upgrade_downgrade_upgrade(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/nested/dir/routet2i.db"
    upgrade(url)
    assert current_revision(url) == head_revision()
    assert set(inspect(create_engine(url)).get_table_names()) >= TABLES
    assert_matches_models(url)
    downgrade(url, "base")
    assert not TABLES & set(inspect(create_engine(url)).get_table_names())
    upgrade(url)
    assert current_revision(url) == head_revision()


@pytest.mark.integration
def test_postgres_schema_matches_models(pg_url: str) -> None:
    assert current_revision(pg_url) == head_revision()
    assert_matches_models(pg_url)


@pytest.mark.integration
def test_postgres_downgrade_and_upgrade(pg_url: str) -> None:
    base, name = pg_url.rsplit("/", 1)
    scratch_name = f"{name}_scratch"  # derived from the session's database, so parallel runs do not collide
    scratch = f"{base}/{scratch_name}"
    admin = create_engine(pg_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{scratch_name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{scratch_name}"'))
    try:
        upgrade(scratch)
        downgrade(scratch, "base")
        assert not TABLES & set(inspect(create_engine(scratch)).get_table_names())
        upgrade(scratch)
        assert current_revision(scratch) == head_revision()
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{scratch_name}" WITH (FORCE)'))
