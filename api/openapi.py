"""The OpenAPI 3.1 document, built from the same pydantic models that validate requests.

Each view declares what it takes and answers with :func:`documented`; :func:`build_spec` walks the URL map,
so a documented route cannot drift from the validation it performs (both read the same model classes). Every
route is documented except those listed in :data:`UNDOCUMENTED`, each with its reason (a test holds both).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from flask import Blueprint, Flask, current_app, jsonify
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api.state import ApiState, state
from core import __version__

F = TypeVar("F", bound=Callable[..., Any])

PNG = "image/png"
PROMETHEUS_TEXT = "text/plain"
"""Media types a response may be documented with instead of a model (its body is then a string)."""

UNDOCUMENTED = {
    "openapi.spec": "the document itself",
    "dashboard.page": "the dashboard's static HTML page; its data comes from the documented /v1 endpoints",
    "dashboard.static": "the dashboard's static scripts and style sheets",
}
"""The endpoints left out of the document, by Flask endpoint name, with the reason."""

ModelRef = type[BaseModel] | Callable[[ApiState], type[BaseModel]]


@dataclass(frozen=True)
class Doc:
    """What one view takes and answers.

    Attributes:
        summary: one line for humans.
        tag: the group the operation is listed under.
        responses: status code -> (description, response model, a media type such as ``PNG``, or None for
            no body).
        body: the JSON request model (or a function of the app's state returning it, for settings-dependent limits).
        query: the model of the query string.
        secured: needs ``Authorization: Bearer``.
    """

    summary: str
    tag: str
    responses: Mapping[int, tuple[str, type[BaseModel] | str | None]]
    body: ModelRef | None = None
    query: type[BaseModel] | None = None
    secured: bool = True
    extra_errors: tuple[int, ...] = field(default=())
    error_model: type[BaseModel] | None = None
    """The body of error responses (None: the API's usual :class:`ErrorBody`)."""


def documented(**kwargs: Any) -> Callable[[F], F]:
    doc = Doc(**kwargs)

    def attach(view: F) -> F:
        view.__openapi__ = doc  # type: ignore[attr-defined]
        return view

    return attach


class FieldError(BaseModel):
    field: str
    message: str


class ErrorDetail(BaseModel):
    model_config = {"extra": "allow"}

    code: str
    message: str
    field: str | None = None
    errors: list[FieldError] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_TEXT = {
    400: "Malformed request (not JSON, or a bad query parameter); the field is named.",
    401: "Missing, invalid or revoked API key.",
    403: "The tenant may not do this.",
    404: "No such resource for this tenant.",
    409: "Conflicts with the resource's state.",
    410: "The resource existed but is gone.",
    413: "The request body is larger than the API reads (ROUTET2I_MAX_REQUEST_BYTES).",
    422: "The body does not validate; the field is named.",
    429: "Over the tenant's rate limit; see Retry-After.",
    500: "The work failed; the message says why.",
    503: "The database or the broker is unavailable, or the server is busy; see Retry-After.",
    504: "The result was not ready in time; the work continues.",
}


def _path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def _query_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent rather than null: drop the null branch of optional fields."""
    schema = {k: v for k, v in schema.items() if not (k == "default" and v is None)}
    options = schema.get("anyOf")
    if options:
        kept = [o for o in options if o.get("type") != "null"]
        if len(kept) == 1:
            rest = {k: v for k, v in schema.items() if k != "anyOf"}
            return {**kept[0], **rest}
    return schema


Operation = tuple[str, str, Doc, type[BaseModel] | None]
"""(path, method, its documentation, its request body's model)."""

Refs = dict[tuple[type[BaseModel], str], dict[str, str]]
"""The ``$ref`` of each model's schema, by model and mode (``validation`` for requests, ``serialization``)."""


def build_spec(app: Flask) -> dict[str, Any]:
    operations, models = _documented(app)
    keys, definitions = models_json_schema(cast(Any, list(models)), ref_template="#/components/schemas/{model}")
    refs = cast(Refs, keys)
    query_props = {
        model: definitions["$defs"][refs[(model, "validation")]["$ref"].rsplit("/", 1)[1]]
        for (model, mode) in models
        if mode == "validation" and model is not None and any(doc.query is model for _, _, doc, _ in operations)
    }
    paths: dict[str, dict[str, Any]] = {}
    for path, method, doc, body in sorted(operations, key=lambda o: (o[0], o[1])):
        paths.setdefault(path, {})[method] = _operation(path, doc, body, refs, query_props)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "RouteT2I",
            "version": __version__,
            "description": "Route text-to-image requests between an edge and a cloud model under a cloud budget.",
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "A tenant's API key."}},
        },
    }


def _documented(app: Flask) -> tuple[list[Operation], dict[tuple[type[BaseModel], str], None]]:
    """Every documented route's operations, and every model their schemas need (in first-seen order)."""
    st: ApiState = app.extensions["routet2i"]
    operations: list[Operation] = []
    models: dict[tuple[type[BaseModel], str], None] = {(ErrorBody, "serialization"): None}
    for rule in app.url_map.iter_rules():
        doc: Doc | None = getattr(app.view_functions[rule.endpoint], "__openapi__", None)
        if doc is None:
            continue
        body = doc.body(st) if callable(doc.body) and not isinstance(doc.body, type) else doc.body
        if body is not None:
            models[(body, "validation")] = None
        if doc.query is not None:
            models[(doc.query, "validation")] = None
        for _, model in doc.responses.values():
            if isinstance(model, type):
                models[(model, "serialization")] = None
        models[(doc.error_model or ErrorBody, "serialization")] = None
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            operations.append((_path(rule.rule), method.lower(), doc, body))
    return operations, models


def _operation(
    path: str, doc: Doc, body: type[BaseModel] | None, refs: Refs, query_props: dict[type[BaseModel], Any]
) -> dict[str, Any]:
    """One operation's OpenAPI object: parameters, body, responses and the errors it may answer."""
    operation: dict[str, Any] = {"summary": doc.summary, "tags": [doc.tag], "responses": {}}
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{([^}]+)}", path)
    ]
    if doc.query is not None:
        schema = query_props[doc.query]
        required = set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            parameters.append(
                {"name": name, "in": "query", "required": name in required, "schema": _query_schema(prop)}
            )
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(body, "validation")]}},
        }
    for status, (description, model) in sorted(doc.responses.items()):
        response: dict[str, Any] = {"description": description}
        if isinstance(model, str):
            schema = {"type": "string", "format": "binary"} if model == PNG else {"type": "string"}
            response["content"] = {model: {"schema": schema}}
        elif isinstance(model, type):
            response["content"] = {"application/json": {"schema": refs[(model, "serialization")]}}
        operation["responses"][str(status)] = response
    errors = set(doc.extra_errors) | {503}
    if doc.secured:
        errors |= {401}
        operation["security"] = [{"bearer": []}]
    if body is not None:
        errors |= {400, 413, 422}
    if doc.query is not None:
        errors |= {400}
    if "{" in path:
        errors |= {404}
    error_schema = refs[(doc.error_model or ErrorBody, "serialization")]
    for status in sorted(errors):
        operation["responses"].setdefault(
            str(status),
            {"description": ERROR_TEXT[status], "content": {"application/json": {"schema": error_schema}}},
        )
    return operation


def undocumented(app: Flask) -> list[str]:
    """The app's endpoints that are neither documented nor listed in :data:`UNDOCUMENTED` (should be none)."""
    return sorted(
        rule.endpoint
        for rule in app.url_map.iter_rules()
        if not hasattr(app.view_functions[rule.endpoint], "__openapi__") and rule.endpoint not in UNDOCUMENTED
    )


blueprint = Blueprint("openapi", __name__)


@blueprint.get("/openapi.json")
def spec() -> Any:
    """The API described in OpenAPI 3.1 (built once per process)."""
    st = state()
    if st.openapi is None:
        st.openapi = build_spec(current_app._get_current_object())  # type: ignore[attr-defined]
    return jsonify(st.openapi)
