"""``POST /v1/images/generations``: the OpenAI Images API, served by the routing pipeline.

Point any OpenAI client at RouteT2I (``base_url=".../v1"``, ``api_key=<tenant key>``) and every image goes
through the same jobs, decisions and cost accounting as ``POST /v1/jobs``. ``model`` chooses the routing:
``routet2i`` (the router decides), ``edge`` or ``cloud`` (a forced tier, if the tenant may). The request waits
for its images up to ``images_wait_s``; the job ids and tiers come back in ``X-RouteT2I-Job`` and
``X-RouteT2I-Tier`` headers. Errors use OpenAI's shape and status codes.

Images asked for as ``url`` are served by ``GET /v1/images/<job_id>.png`` with an expiring HMAC signature in
the query string, so (like OpenAI's URLs) they can be fetched without the API key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import uuid
from typing import Annotated, Any, Literal

from flask import Blueprint, Response, jsonify, request, url_for
from pydantic import Field, StringConstraints, ValidationError, field_validator

from api.auth import authenticate
from api.errors import ApiError
from api.jobs import submit_jobs
from api.openapi import PNG, documented
from api.schemas import SIZE_MULTIPLE, StrictModel
from api.state import state
from db.generations import primary_generation
from db.jobs import get_job
from db.models import JobStatus

blueprint = Blueprint("openai", __name__)

MODELS = {"routet2i": None, "edge": "edge", "cloud": "cloud"}
"""``model`` values and the tier each forces (None: the router decides)."""

MAX_IMAGES = 10
POLL_S = 0.05
SIGNING_KEY = "routet2i:url-signing-key"

ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


class ImageRequest(StrictModel):
    """The body of an OpenAI ``images.generate`` call (``quality`` and ``style`` are accepted and ignored)."""

    prompt: str
    n: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1
    size: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,5}x[0-9]{1,5}$")] | None = None
    response_format: Literal["url", "b64_json"] = "url"
    model: str = "routet2i"
    user: Annotated[str, StringConstraints(max_length=256)] | None = None
    quality: Annotated[str, StringConstraints(max_length=32)] | None = None
    style: Annotated[str, StringConstraints(max_length=32)] | None = None

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"must be one of {', '.join(MODELS)}")
        return value


class OpenAIErrorDetail(StrictModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(StrictModel):
    error: OpenAIErrorDetail


class ImageData(StrictModel):
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(StrictModel):
    created: int
    data: list[ImageData]


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    kind, default_code = ERROR_TYPES.get(status, ("invalid_request_error", None))
    error = ApiError(status, kind, message, field=param)
    error.openai = {"message": message, "type": kind, "param": param, "code": code or default_code}  # type: ignore[attr-defined]
    return error


@blueprint.errorhandler(ApiError)
def _as_openai_error(exc: ApiError) -> Any:
    body = getattr(exc, "openai", None) or {
        "message": exc.message,
        "type": ERROR_TYPES.get(exc.status, ("invalid_request_error", None))[0],
        "param": exc.field if exc.field not in ("body", "Authorization") else None,
        "code": ERROR_TYPES.get(exc.status, (None, None))[1] or exc.code,
    }
    response = jsonify({"error": body})
    response.status_code = exc.status
    response.headers.update(exc.headers)
    return response


def signing_key() -> bytes:
    """The deployment's URL-signing key: from settings, else a random one shared through Redis."""
    st = state()
    if st.settings.url_signing_key is not None:
        return st.settings.url_signing_key.get_secret_value().encode()
    st.redis.set(SIGNING_KEY, secrets.token_hex(32), nx=True)
    value = st.redis.get(SIGNING_KEY)
    assert value is not None
    return value if isinstance(value, bytes) else str(value).encode()


def sign(job_id: str, expires: int) -> str:
    return hmac.new(signing_key(), f"{job_id}:{expires}".encode(), hashlib.sha256).hexdigest()


def _parse(raw: Any) -> ImageRequest:
    if not isinstance(raw, dict):
        raise openai_error(400, "We could not parse the JSON body of your request. It must be a JSON object.")
    unknown = sorted(set(raw) - set(ImageRequest.model_fields))
    if unknown:
        raise openai_error(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    try:
        return ImageRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise openai_error(400, f"Invalid value for '{param}': {first['msg']}", param=param) from exc


def _size(spec: ImageRequest) -> tuple[int | None, int | None]:
    if spec.size is None:
        return None, None
    settings = state().settings
    width, height = (int(part) for part in spec.size.split("x"))
    for side in (width, height):
        if not settings.min_size <= side <= settings.max_size or side % SIZE_MULTIPLE:
            raise openai_error(
                400,
                f"'{spec.size}' is not a supported size: width and height must be multiples of {SIZE_MULTIPLE} "
                f"from {settings.min_size} to {settings.max_size}",
                param="size",
            )
    return width, height


def _wait(job_ids: list[uuid.UUID], deadline: float) -> dict[uuid.UUID, Any]:
    """Poll until every job is terminal or the deadline passes; returns the jobs as last seen."""
    st = state()
    while True:
        with st.sessions() as session:
            jobs = {job_id: get_job(session, job_id) for job_id in job_ids}
        if all(job is not None and JobStatus(job.status).terminal for job in jobs.values()):
            return jobs
        if time.monotonic() > deadline:
            return jobs
        time.sleep(POLL_S)


@blueprint.post("/v1/images/generations")
@documented(
    summary="Generate images (OpenAI Images API compatible)",
    tag="openai",
    body=ImageRequest,
    responses={200: ("The images, in OpenAI's response shape.", ImagesResponse)},
    extra_errors=(403, 429, 500, 504),
    error_model=OpenAIErrorBody,
)
def generations() -> Any:
    authenticate()
    st = state()
    spec = _parse(request.get_json(silent=True))
    width, height = _size(spec)
    try:
        job_spec = st.job_create_model.model_validate(
            {"prompt": spec.prompt, "width": width, "height": height, "tier": MODELS[spec.model]}
        )
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise openai_error(400, f"Invalid value for '{param}': {first['msg']}", param=param) from exc

    deadline = time.monotonic() + st.settings.images_wait_s
    try:
        job_ids = [job.id for job, _ in submit_jobs([job_spec] * spec.n)]
    except ApiError as exc:
        raise openai_error(exc.status, exc.message, param=exc.field if exc.field == "tier" else None) from exc
    jobs = _wait(job_ids, deadline)

    headers = {
        "X-RouteT2I-Job": ",".join(str(j) for j in job_ids),
        "X-RouteT2I-Tier": ",".join(str(jobs[j].tier or "") for j in job_ids),
    }
    unfinished = [j for j in job_ids if not JobStatus(jobs[j].status).terminal]
    if unfinished:
        error = openai_error(
            504,
            f"the images were not ready within {st.settings.images_wait_s:.0f}s; the jobs continue: "
            + ", ".join(f"/v1/jobs/{j}" for j in unfinished),
        )
        error.headers.update(headers)
        raise error
    failed = [jobs[j] for j in job_ids if jobs[j].status == JobStatus.FAILED]
    if failed:
        error = openai_error(500, f"image generation failed: {failed[0].error}")
        error.headers.update(headers)
        raise error

    data = []
    with st.sessions() as session:
        for job_id in job_ids:
            generation = primary_generation(session, job_id=job_id)
            assert generation is not None
            if spec.response_format == "b64_json":
                data.append({"b64_json": base64.b64encode(st.images.read(generation.image_path)).decode()})
            else:
                expires = int(time.time()) + st.settings.image_url_ttl_s
                url = url_for(
                    "openai.signed_image",
                    job_id=str(job_id),
                    expires=expires,
                    sig=sign(str(job_id), expires),
                    _external=True,
                )
                data.append({"url": url})
    response = jsonify({"created": int(time.time()), "data": data})
    response.headers.update(headers)
    return response


@blueprint.get("/v1/images/<job_id>.png")
@documented(
    summary="An image behind a signed, expiring URL (no API key needed)",
    tag="openai",
    secured=False,
    responses={200: ("The PNG.", PNG)},
    extra_errors=(403,),
    error_model=OpenAIErrorBody,
)
def signed_image(job_id: str) -> Any:
    st = state()
    expires, signature = request.args.get("expires", ""), request.args.get("sig", "")
    if not expires.isdigit() or not hmac.compare_digest(signature, sign(job_id, int(expires))):
        raise openai_error(403, "invalid image signature", param="sig")
    if int(expires) < time.time():
        raise openai_error(403, "the image URL has expired", param="expires")
    try:
        key = uuid.UUID(job_id)
    except ValueError:
        raise openai_error(404, "no such image") from None
    with st.sessions() as session:
        generation = primary_generation(session, job_id=key)
        if generation is None:
            raise openai_error(404, "no such image")
        path = generation.image_path
    return Response(st.images.read(path), mimetype="image/png", headers={"Cache-Control": "private, max-age=3600"})
