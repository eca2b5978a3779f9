"""Helpers shared by CLI commands."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from pydantic import ValidationError

from core.logs import configure_logging
from core.settings import Settings


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with a readable message instead of a traceback when they are wrong."""
    try:
        settings = Settings.from_env(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [f"  ROUTET2I_{'__'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()]
        raise click.ClickException("invalid settings:\n" + "\n".join(lines)) from exc
    configure_logging(settings.log_level, json_lines=settings.log_json)
    return settings


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)
