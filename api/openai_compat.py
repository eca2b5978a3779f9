"""``POST /v1/images/generations``: the OpenAI Images API, served by the routing pipeline.

Point any OpenAI client at RouteT2I (``base_url=".../v1"``, ``api_key=<tenant key>``) and every image goes
through the same jobs, decisions and cost accounting as ``POST /v1/jobs``. ``model`` chooses the routing:
``routet2i`` (the router decides), ``edge`` or ``cloud`` (a forced tier, if the tenant may). The request waits
for its images up to ``images_wait_s``; the job ids and tiers come back in ``X-RouteT2I-Job`` and
``X-RouteT2I-Tier`` headers. Errors use OpenAI's shape and status codes.

A waiting request holds a server thread, so each process holds at most ``images_waiters`` of them at once (one
slot each, taken before any job is created) and answers 503 with Retry-After beyond; ``routet2i api`` gives
each process that many threads on top of its others, so the waits never starve the other requests and the
health probes. A wait looks at its jobs ever less often: every 50 ms at first, every second at most once it has
waited ten seconds, so long waits cost the database little.

Images asked for as ``url`` are served by ``GET /v1/images/<job_id>.png`` with an expiring HMAC signature in
the query string, so (like OpenAI's URLs) they can be fetched without the API key. The signing key comes from
``url_signing_key``, else is derived from ``secret_key``, else is a random key in ``cache_dir`` (mode 0600)
that every API process sharing the folder reads; it is never stored in Redis.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from flask import Blueprint, Response, jsonify, request, url_for
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, ValidationInfo, field_validator
from werkzeug.exceptions import RequestEntityTooLarge

from api.auth import authenticate
from api.errors import ApiError, too_large_message
from api.jobs import json_body, submit_jobs
from api.openapi import PNG, documented
from api.schemas import SIZE_MULTIPLE, StrictModel
from api.state import state
from core.settings import Settings
from db.generations import primary_generation
from db.jobs import get_job
from db.models import Job, JobStatus

log = logging.getLogger(__name__)
blueprint = Blueprint("openai", __name__)

ROUTED = "routet2i"
"""The ``model`` that lets the router decide; any other ``model`` is one of the deployment's tiers, forced."""

MAX_IMAGES = 10
POLL_S = 0.05
"""First pause between two looks at the jobs of a waiting request."""
MAX_POLL_S = 1.0
"""Longest pause between two looks: the pause grows with the time waited (a tenth of it), up to this."""
BUSY_RETRY_AFTER_S = 5
"""Retry-After of the 503 answered when every waiter slot of the process is taken."""
SIGNING_LABEL = b"routet2i/url-signing-key/v1"
"""What the signing key is derived from under ``secret_key`` (HMAC-SHA256)."""
KEY_FILE = "url-signing-key"
"""The random signing key's file in ``cache_dir`` when no secret is configured."""

ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", None),
    413: ("invalid_request_error", "request_too_large"),
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
    def _known_model(cls, value: str, info: ValidationInfo) -> str:
        models = (ROUTED, *(info.context or {}).get("tiers", ()))
        if value not in models:
            raise ValueError(f"must be one of {', '.join(models)}")
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


class SignedImageQuery(BaseModel):
    """The query string of a signed image URL (other parameters are ignored)."""

    model_config = ConfigDict(extra="ignore")

    expires: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,12}$")]
    """Unix time after which the URL is refused."""
    sig: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    """HMAC-SHA256 of ``<job_id>:<expires>`` under the deployment's signing key, in hex."""


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


@blueprint.errorhandler(RequestEntityTooLarge)
def _too_large(exc: RequestEntityTooLarge) -> Any:
    return _as_openai_error(openai_error(413, too_large_message()))


def signing_key() -> bytes:
    """The deployment's URL-signing key, loaded once per process (see the module's docstring).

    Raises:
        ApiError: 503 when no secret is configured and the key's file can be neither read nor created.
    """
    st = state()
    if st.url_signing_key is None:
        try:
            st.url_signing_key = derive_signing_key(st.settings)
        except (OSError, ValueError) as exc:
            log.error("no URL-signing key", extra={"error": str(exc)})
            raise openai_error(
                503,
                "signed image URLs are unavailable: set ROUTET2I_SECRET_KEY, or let the API keep a key in "
                f"{st.settings.cache_dir / KEY_FILE} ({exc})",
            ) from exc
    return st.url_signing_key


def derive_signing_key(settings: Settings) -> bytes:
    """``url_signing_key``; else an HMAC of a fixed label under ``secret_key``; else the key file's."""
    if settings.url_signing_key is not None:
        return settings.url_signing_key.get_secret_value().encode()
    if settings.secret_key is not None:
        return hmac.new(settings.secret_key.get_secret_value().encode(), SIGNING_LABEL, hashlib.sha256).digest()
    return _key_file(settings.cache_dir / KEY_FILE)


def _key_file(path: Path) -> bytes:
    """A random 32-byte key shared through ``path``: created once, atomically, readable by its owner only."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        with os.fdopen(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(secrets.token_hex(32))
        try:
            os.link(draft, path)  # atomic, and refused when another process was first: all then read its key
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    key = bytes.fromhex(path.read_text().strip())
    if len(key) < 32:
        raise ValueError(f"{path} does not hold a key of 32 bytes or more")
    return key


def sign(job_id: str, expires: int) -> str:
    message = f"{job_id}:{expires}".encode("utf-8", "surrogatepass")
    return hmac.new(signing_key(), message, hashlib.sha256).hexdigest()


def _parse(raw: Any) -> ImageRequest:
    if not isinstance(raw, dict):
        raise openai_error(400, "We could not parse the JSON body of your request. It must be a JSON object.")
    unknown = sorted(set(raw) - set(ImageRequest.model_fields))
    if unknown:
        raise openai_error(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    try:
        return ImageRequest.model_validate(raw, context={"tiers": state().settings.tier_names})
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


def _job_spec(spec: ImageRequest) -> Any:
    """The job each image of ``spec`` becomes, validated against the deployment's limits."""
    width, height = _size(spec)
    try:
        return state().job_create_model.model_validate(
            {
                "prompt": spec.prompt,
                "width": width,
                "height": height,
                "tier": None if spec.model == ROUTED else spec.model,
            }
        )
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise openai_error(400, f"Invalid value for '{param}': {first['msg']}", param=param) from exc


def _wait(job_ids: list[uuid.UUID], deadline: float) -> dict[uuid.UUID, Any]:
    """Look at the jobs until every one is terminal or the deadline passes, ever less often (from ``POLL_S``,
    a tenth of the time waited, up to ``MAX_POLL_S``); returns the jobs as last seen."""
    st = state()
    started = time.monotonic()
    jobs: dict[uuid.UUID, Any] = {}
    while True:
        pending = [j for j in job_ids if j not in jobs or not JobStatus(jobs[j].status).terminal]
        with st.sessions() as session:
            jobs.update({job_id: get_job(session, job_id) for job_id in pending})
        now = time.monotonic()
        if now >= deadline or all(JobStatus(job.status).terminal for job in jobs.values()):
            return jobs
        time.sleep(min(MAX_POLL_S, max(POLL_S, (now - started) / 10), deadline - now))


@blueprint.post("/v1/images/generations")
@documented(
    summary="Generate images (OpenAI Images API compatible)",
    tag="openai",
    body=ImageRequest,
    responses={200: ("The images, in OpenAI's response shape.", ImagesResponse)},
    extra_errors=(403, 409, 429, 500, 504),
    error_model=OpenAIErrorBody,
)
def generations() -> Any:
    authenticate()
    st = state()
    spec = _parse(json_body())
    job_spec = _job_spec(spec)
    if spec.response_format == "url":
        signing_key()  # refuse before any job exists if the URLs could not be signed
    if not st.image_waits.acquire(blocking=False):
        error = openai_error(
            503,
            f"this server already holds {st.settings.images_waiters} image requests waiting for their images; "
            "retry later",
        )
        error.headers["Retry-After"] = str(BUSY_RETRY_AFTER_S)
        raise error
    try:
        return _generate(spec, job_spec)
    finally:
        st.image_waits.release()


def _generate(spec: ImageRequest, job_spec: Any) -> Any:
    """Submit ``spec.n`` jobs, wait for them, and answer their images (or why there are none)."""
    st = state()
    deadline = time.monotonic() + st.settings.images_wait_s
    try:
        job_ids = [job.id for job, _ in submit_jobs([job_spec] * spec.n)]
    except ApiError as exc:
        error = openai_error(exc.status, exc.message, param=exc.field if exc.field == "tier" else None)
        error.headers.update(exc.headers)  # Retry-After of a 429 or a 503
        raise error from exc
    jobs = _wait(job_ids, deadline)

    headers = {
        "X-RouteT2I-Job": ",".join(str(j) for j in job_ids),
        "X-RouteT2I-Tier": ",".join(str(jobs[j].tier or "") for j in job_ids),
    }
    unfinished = [j for j in job_ids if not JobStatus(jobs[j].status).terminal]
    # Failed, or cancelled or expired through the jobs API meanwhile: no image to answer with.
    failed = [jobs[j] for j in job_ids if JobStatus(jobs[j].status).terminal and jobs[j].status != JobStatus.SUCCEEDED]
    if unfinished or failed:
        error = (
            openai_error(
                504,
                f"the images were not ready within {st.settings.images_wait_s:.0f}s; the jobs continue: "
                + ", ".join(f"/v1/jobs/{j}" for j in unfinished),
            )
            if unfinished
            else ended_without_image(failed[0])
        )
        error.headers.update(headers)
        raise error
    response = jsonify({"created": int(time.time()), "data": _image_data(spec, job_ids)})
    response.headers.update(headers)
    return response


REFUSED = "refused the request ("
"""How a tier's generator words a refusal (an HTTP 400 or a content filter: worker/generators.py)."""


def ended_without_image(job: Job) -> ApiError:
    """The error for a job that ended without an image: the tier refused the prompt (400, as OpenAI answers a
    content-policy refusal), it was cancelled through the jobs API (409), its deadline passed (504), or its
    generation failed (500)."""
    if job.status == JobStatus.CANCELLED:
        return openai_error(409, "the job was cancelled through the jobs API before its image was made")
    if job.status == JobStatus.EXPIRED:
        return openai_error(504, f"the job's deadline passed before its image was made: {job.error}")
    if REFUSED in (job.error or ""):
        return openai_error(400, f"image generation refused: {job.error}", param="prompt")
    return openai_error(500, f"image generation failed: {job.error}")


def _image_data(spec: ImageRequest, job_ids: list[uuid.UUID]) -> list[dict[str, str]]:
    """Each job's image, as base64 or as a signed URL."""
    st = state()
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
    return data


@blueprint.get("/v1/images/<job_id>.png")
@documented(
    summary="An image behind a signed, expiring URL (no API key needed)",
    tag="openai",
    secured=False,
    query=SignedImageQuery,
    responses={200: ("The PNG.", PNG)},
    extra_errors=(403, 410),
    error_model=OpenAIErrorBody,
)
def signed_image(job_id: str) -> Any:
    st = state()
    try:
        query = SignedImageQuery.model_validate(request.args.to_dict())
    except ValidationError as exc:
        param = str(exc.errors(include_url=False)[0]["loc"][0])
        raise openai_error(403, f"invalid image URL: {param} is missing or malformed", param=param) from exc
    if not hmac.compare_digest(query.sig.encode(), sign(job_id, int(query.expires)).encode()):
        raise openai_error(403, "invalid image signature", param="sig")
    if int(query.expires) < time.time():
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
    try:
        data = st.images.read(path)
    except FileNotFoundError:
        raise openai_error(410, "the image is no longer stored") from None
    return Response(data, mimetype="image/png", headers={"Cache-Control": "private, max-age=3600"})
