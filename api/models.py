"""``/v1/models``: the model registry over HTTP, for admin keys: list, inspect, promote, roll back."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict, Field

from api.auth import authenticate, principal
from api.errors import ApiError
from api.jobs import parse_query
from api.openapi import documented
from api.state import state
from db.registry import RegistryError, get_model, list_models, model_summary, promote, rollback
from db.session import transaction

blueprint = Blueprint("models", __name__)
blueprint.before_request(authenticate)


class ModelListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slot: str | None = Field(
        default=None, max_length=160, description="Only this deployment router's models, e.g. default/routet2i."
    )
    limit: int = Field(default=50, ge=1, le=1000)


class RollbackQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slot: str | None = Field(
        default=None, max_length=160, description="The deployment router, e.g. default/routet2i (default: this one)."
    )


class ModelOut(BaseModel):
    id: uuid.UUID
    slot: str = Field(description="The deployment router the model serves.")
    kind: str = Field(description="The artifact's own router.")
    version: str
    state: str = Field(description="champion, retired, challenger or candidate.")
    sha256: str
    encoder: str | None
    source: str
    labels: int
    trained_from: str | None
    trained_to: str | None
    evaluation: dict[str, Any] | None = Field(description="The verdict that judged it, with its figures.")
    promoted_by: str | None
    promoted_at: str | None
    retired_at: str | None
    created_at: str
    size_bytes: int


class ModelPage(BaseModel):
    items: list[ModelOut]


def _admin() -> None:
    if not principal().is_admin:
        raise ApiError(403, "forbidden", "the model registry serves the whole deployment: it needs an admin key")


def _model_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(404, "not_found", f"no model with id {raw!r}", field="model_id") from None


@blueprint.get("/v1/models")
@documented(
    summary="Registered router models, newest first (admin keys only)",
    tag="models",
    query=ModelListQuery,
    responses={200: ("Models.", ModelPage)},
    extra_errors=(403,),
)
def index() -> Any:
    _admin()
    query = parse_query(ModelListQuery)
    with state().sessions() as session:
        items = [model_summary(row) for row in list_models(session, slot=query.slot, limit=query.limit)]
    return jsonify({"items": items})


@blueprint.get("/v1/models/<model_id>")
@documented(summary="One registered model (admin keys only)", tag="models", responses={200: ("The model.", ModelOut)})
def get(model_id: str) -> Any:
    _admin()
    with state().sessions() as session:
        row = get_model(session, _model_id(model_id))
        if row is None:
            raise ApiError(404, "not_found", f"no model with id {model_id!r}", field="model_id")
        return jsonify(model_summary(row))


@blueprint.post("/v1/models/<model_id>/promote")
@documented(
    summary="Make a model its router's champion (admin keys only)",
    tag="models",
    responses={200: ("The model, now champion.", ModelOut)},
    extra_errors=(403,),
)
def promote_model(model_id: str) -> Any:
    _admin()
    key = _model_id(model_id)
    try:
        with transaction(state().sessions) as session:
            return jsonify(model_summary(promote(session, key, by=f"admin {principal().tenant_name}")))
    except RegistryError as exc:
        raise ApiError(404, "not_found", str(exc), field="model_id") from exc


@blueprint.post("/v1/models/rollback")
@documented(
    summary="Make the previous champion the champion again (admin keys only)",
    tag="models",
    query=RollbackQuery,
    responses={200: ("The model, champion again.", ModelOut)},
    extra_errors=(403, 409),
)
def roll_back() -> Any:
    _admin()
    slot = parse_query(RollbackQuery).slot or state().settings.model_slot
    try:
        with transaction(state().sessions) as session:
            return jsonify(model_summary(rollback(session, slot, by=f"admin {principal().tenant_name}")))
    except RegistryError as exc:
        raise ApiError(409, "nothing_to_roll_back", str(exc), field="slot") from exc
