"""Settings come from ROUTET2I_* variables, keep per-tier defaults, and refuse bad values clearly."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from cli.main import main
from core.settings import Settings


def test_defaults_run_offline_on_embedded_services(monkeypatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("ROUTET2I_"):
            monkeypatch.delenv(key)
    settings = Settings.from_env()
    assert settings.database_url == "sqlite:///./var/routet2i.db"
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert str(settings.image_dir) == "var/images"
    assert (settings.edge.model, settings.cloud.model) == ("offline:edge", "offline:cloud")
    assert settings.edge.price_per_image < settings.cloud.price_per_image


def test_one_nested_variable_keeps_the_tiers_other_defaults(monkeypatch) -> None:
    monkeypatch.setenv("ROUTET2I_CLOUD__STEPS", "5")
    settings = Settings.from_env()
    assert settings.cloud.steps == 5
    assert settings.cloud.model == "offline:cloud"
    assert settings.cloud.price_per_image == 0.065


def test_postgres_urls_get_the_psycopg_driver() -> None:
    assert Settings(database_url="postgresql://u@h/db").database_url == "postgresql+psycopg://u@h/db"
    assert Settings(database_url="postgres://u@h/db").database_url == "postgresql+psycopg://u@h/db"


def test_round_trip_through_the_environment(monkeypatch) -> None:
    original = Settings(cloud={"backend": "http", "url": "http://images.example/v1", "api_key": "k"}, cloud_budget=0.4)
    for key, value in original.to_env().items():
        monkeypatch.setenv(key, value)
    restored = Settings.from_env()
    assert restored == original
    assert restored.cloud.api_key is not None and restored.cloud.api_key.get_secret_value() == "k"


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("ROUTET2I_CLOUD_BUDGET", "1.5", "cloud_budget"),
        ("ROUTET2I_EDGE__STEPS", "zero", "steps"),
        ("ROUTET2I_CLOUD__BACKEND", "http", "cloud"),
        ("ROUTET2I_BUDGET_NAME", "has space", "budget_name"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(monkeypatch, variable, value, field) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as info:
        Settings.from_env()
    assert field in str(info.value)
    result = CliRunner().invoke(main, ["db", "current"])
    assert result.exit_code == 1
    assert "invalid settings" in result.output and "ROUTET2I_" in result.output


def test_encoder_backend_choices_are_the_encoders_own() -> None:
    from typing import get_args

    from router.embeddings import BACKENDS

    # The setting lists the choices for validation and documentation; the encoder is where they are implemented.
    assert get_args(Settings.model_fields["encoder_backend"].annotation) == BACKENDS
    assert Settings().encoder_backend == BACKENDS[0]


def test_escalation_needs_the_scorer_and_one_of_its_metrics(monkeypatch) -> None:
    monkeypatch.setenv("ROUTET2I_ESCALATION_RATE", "0.1")
    monkeypatch.setenv("ROUTET2I_SCORER__ENABLED", "false")
    result = CliRunner().invoke(main, ["worker", "--queue", "edge"])
    assert result.exit_code == 1
    assert "ROUTET2I_ESCALATION_RATE" in result.output and "ROUTET2I_SCORER__ENABLED=true" in result.output

    monkeypatch.setenv("ROUTET2I_SCORER__ENABLED", "true")
    monkeypatch.setenv("ROUTET2I_ESCALATION_METRIC", "beauty")
    result = CliRunner().invoke(main, ["worker", "--queue", "edge"])  # refused before any worker starts
    assert result.exit_code == 2
    assert "ROUTET2I_ESCALATION_METRIC='beauty'" in result.output and "routet2i@1" in result.output
    assert "alignment" in result.output
