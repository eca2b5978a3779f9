"""One error shape for the whole API: ``{"error": {"code", "message", "field"?, "errors"?}}``."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy.exc
from flask import Flask, current_app, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered to the client as JSON with ``status``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        error.update(self.extra)
        return {"error": error}


def field_path(location: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in location) or "body"


def from_validation_error(exc: ValidationError, *, status: int = 422) -> ApiError:
    """Turn pydantic's errors into an :class:`ApiError` that names the first offending field."""
    errors = [{"field": field_path(e["loc"]), "message": e["msg"]} for e in exc.errors(include_url=False)]
    first = errors[0]
    return ApiError(
        status,
        "invalid_request",
        f"{first['field']}: {first['message']}",
        field=first["field"],
        errors=errors,
    )


def too_large_message() -> str:
    """What a 413 says: the body's limit (``MAX_CONTENT_LENGTH``, from ``ROUTET2I_MAX_REQUEST_BYTES``)."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    return f"the request body is larger than the {limit} bytes this API reads (ROUTET2I_MAX_REQUEST_BYTES)"


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Any:
        response = jsonify(exc.body())
        response.status_code = exc.status
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(sqlalchemy.exc.OperationalError)
    @app.errorhandler(sqlalchemy.exc.InterfaceError)
    @app.errorhandler(sqlalchemy.exc.TimeoutError)
    def _database_down(exc: Exception) -> Any:
        log.error("database unavailable: %s", exc)
        return _api_error(
            ApiError(
                503,
                "database_unavailable",
                "the job database is unavailable; retry later",
                headers={"Retry-After": "5"},
            )
        )

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> Any:
        return _api_error(ApiError(413, "request_too_large", too_large_message(), field="body"))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        code = (exc.name or "error").lower().replace(" ", "_")
        response = jsonify({"error": {"code": code, "message": exc.description or exc.name}})
        response.status_code = exc.code or 500
        for name, value in exc.get_headers():  # keeps e.g. the Allow header of a 405
            if name.lower() != "content-type":
                response.headers[name] = value
        return response
