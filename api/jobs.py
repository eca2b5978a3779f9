"""Jobs: submit, poll, list, and fetch the image."""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import sqlalchemy.exc
from flask import Blueprint, Response, current_app, jsonify, request, url_for
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session
from werkzeug.exceptions import RequestEntityTooLarge

from api.auth import authenticate, principal
from api.errors import ApiError, from_validation_error
from api.openapi import PNG, documented
from api.schemas import (
    MAX_SEED,
    JobAccepted,
    JobBatchAccepted,
    JobBatchCreateBase,
    JobBatchItem,
    JobCreateBase,
    JobListQuery,
    JobPage,
)
from api.state import state
from db.documents import JobOut, job_document, job_out
from db.generations import primary_generation
from db.jobs import (
    NewJob,
    create_jobs,
    get_job,
    get_jobs_by_idempotency_keys,
    list_jobs,
)
from db.lifecycle import expire_if_overdue, fail, is_done
from db.models import Job, utcnow
from db.pagination import InvalidCursor, as_utc
from db.redis_state import burst, give_back
from db.session import transaction
from db.webhooks import webhook_host
from worker.transport import BROKER_ERRORS, ROUTE_TASK, chunks, publish_many

log = logging.getLogger(__name__)
blueprint = Blueprint("jobs", __name__)
blueprint.before_request(authenticate)

Q = TypeVar("Q", bound=BaseModel)

DATABASE_DOWN = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError)


def parse_query(model: type[Q]) -> Q:
    """Validate the query string against ``model`` (unknown parameters are refused)."""
    args = request.args.to_dict()
    for name, value in args.items():
        if "\x00" in value:  # PostgreSQL cannot even compare with such a string
            raise ApiError(400, "invalid_request", f"{name}: must not contain NUL characters", field=name)
    try:
        return model.model_validate(args, context={"tiers": state().settings.tier_names})
    except ValidationError as exc:
        raise from_validation_error(exc, status=400) from exc


def json_body() -> Any:
    """The request's JSON body; None when it is missing or not JSON (nested too deeply included).

    Raises:
        RequestEntityTooLarge: for a body over ``MAX_CONTENT_LENGTH``, also one sent without a length (chunked),
            which werkzeug would otherwise cut at the limit without a word.
    """
    data = request.get_data(cache=True)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    unsized = request.content_length is None and limit is not None and len(data) >= limit
    if unsized and request.environ["wsgi.input"].read(1):  # the server still holds more beyond the limit
        raise RequestEntityTooLarge()
    return request.get_json(silent=True)


def parse_body(model: type[Q]) -> Q:
    body = json_body()
    if body is None:
        raise ApiError(
            400,
            "invalid_json",
            "request body must be a JSON object (Content-Type: application/json)",
            field="body",
        )
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "request body must be a JSON object", field="body")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


def parse_job_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(404, "not_found", f"no job with id {raw!r}: not a valid job id", field="job_id") from None


def job_url(job_id: uuid.UUID) -> str:
    return url_for("jobs.get", job_id=str(job_id), _external=False)


def load_job(session: Session, raw_id: str, *, for_update: bool = False) -> Job:
    """The caller's job; another tenant's job answers exactly like a missing one."""
    job = get_job(session, parse_job_id(raw_id), for_update=for_update)
    if job is None or not principal().sees(job.tenant_id):
        raise ApiError(404, "not_found", f"no job with id {raw_id!r}", field="job_id")
    return job


def _same_request(job: Job, spec: JobCreateBase) -> bool:
    """Whether ``spec`` asks exactly for ``job``: every field alike (the forced tier, the webhook and the deadline
    included); a replay that leaves the seed out matches the seed chosen for the job."""
    return (
        (job.prompt, job.steps, job.width, job.height, job.requested_tier, job.webhook_url)
        == (spec.prompt, spec.steps, spec.width, spec.height, spec.tier, spec.webhook_url)
        and (spec.seed is None or spec.seed == job.seed)
        and _same_deadline(job, spec.deadline_s)
    )


def _same_deadline(job: Job, deadline_s: float | None) -> bool:
    """Whether ``job`` was given ``deadline_s`` (to the second: the job keeps the instant, not the duration)."""
    if job.deadline_at is None or deadline_s is None:
        return job.deadline_at is None and deadline_s is None
    return abs((as_utc(job.deadline_at) - as_utc(job.created_at)).total_seconds() - deadline_s) < 1.0


def _accepted(job: Job, status_code: int) -> tuple[Response, int, dict[str, str]]:
    url = job_url(job.id)
    body = JobAccepted(id=job.id, url=url, status=job.status)  # type: ignore[arg-type]
    return jsonify(body.model_dump(mode="json")), status_code, {"Location": url}


def submit_job(spec: JobCreateBase) -> tuple[Job, bool]:
    """Create (or find, by idempotency key) the caller's job and enqueue it for routing.

    Returns:
        The job and whether it was created by this call.

    Raises:
        ApiError: as :func:`submit_jobs`.
    """
    ((job, created),) = submit_jobs([spec])
    return job, created


def submit_jobs(specs: Sequence[JobCreateBase], *, field_prefix: str | None = None) -> list[tuple[Job, bool]]:
    """Create (or find, by idempotency key) the caller's jobs in one transaction and enqueue them for routing.

    All or nothing: every job is checked (forced tier, idempotency key, rate limit) before any is written. An
    exact replay (an idempotency key used before for the same request) is answered before the rate limit is
    consulted, and only new jobs count against it: a retry never gets a 429 instead of its job.

    Args:
        specs: the jobs, validated.
        field_prefix: how errors name job ``i``'s fields: None for a single job (``tier``), ``"jobs"`` for a
            batch (``jobs.3.tier``).

    Returns:
        Per job, in order: the job and whether it was created by this call (False: the idempotency key's
        earlier job).

    Raises:
        ApiError: 403 for a forced tier the tenant may not use, 429 over the rate limit, 409 when an
            idempotency key was used for a different request, 422 for a key repeated within the batch or a
            batch larger than the tenant's burst, 503 when the database or the broker cannot take the jobs (a
            job that cannot be enqueued is failed, never left hanging).
    """

    def field(i: int, name: str) -> str:
        return name if field_prefix is None else f"{field_prefix}.{i}.{name}"

    keys = _check_submissions(specs, field, field_prefix)
    try:
        try:
            results = _insert(specs, keys, field)
        except sqlalchemy.exc.IntegrityError:
            if not keys:
                raise
            # A concurrent request with one of the keys committed first: once more, which now finds its job.
            results = _insert(specs, keys, field)
    except DATABASE_DOWN as exc:
        raise ApiError(
            503, "database_unavailable", "the job database is unavailable; retry later", headers={"Retry-After": "5"}
        ) from exc
    _enqueue([job for job, new in results if new])
    return results


def _check_submissions(
    specs: Sequence[JobCreateBase], field: Callable[[int, str], str], field_prefix: str | None
) -> dict[str, int]:
    """Refuse the submissions unless the caller may make every one of them (forced tiers, idempotency keys
    unique within the request and not used before for another request, then for the new jobs only the
    tenant's burst and rate limit). Returns each idempotency key's job index."""
    st = state()
    who = principal()
    keys = _check_tiers_and_keys(specs, field)
    new = len(specs) - _count_replays(specs, keys, field)
    if new == 0:
        return keys  # every job is an exact replay: nothing is created, so nothing is charged
    limit = who.rate_limit_per_minute if who.rate_limit_per_minute is not None else st.settings.rate_limit_per_minute
    if limit > 0 and new > burst(limit):
        raise ApiError(
            422,
            "invalid_request",
            f"at most {burst(limit)} new jobs per request for tenant {who.tenant_name!r} "
            f"(its limit of {limit} submissions per minute allows bursts of {burst(limit)})",
            field=field_prefix or "body",
        )
    wait = st.rate_limiter.check(who.tenant_id, limit, cost=new)
    if wait is not None:
        raise ApiError(
            429,
            "rate_limited",
            f"tenant {who.tenant_name!r} is over its limit of {limit} submissions per minute",
            headers={"Retry-After": str(int(wait))},
        )
    return keys


def _count_replays(specs: Sequence[JobCreateBase], keys: dict[str, int], field: Callable[[int, str], str]) -> int:
    """How many of ``specs`` are exact replays of the caller's earlier jobs (409 for a key used before for
    another request)."""
    if not keys:
        return 0
    with state().sessions() as session:
        earlier = get_jobs_by_idempotency_keys(session, tenant_id=principal().tenant_id, keys=list(keys))
        for key, job in earlier.items():
            _check_replay(job, specs[keys[key]], field=field(keys[key], "idempotency_key"))
    return len(earlier)


def _check_tiers_and_keys(specs: Sequence[JobCreateBase], field: Callable[[int, str], str]) -> dict[str, int]:
    """Refuse a forced tier the caller may not use and an idempotency key repeated within the request.
    Returns each idempotency key's job index."""
    who = principal()
    keys: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.tier is not None and not (who.is_admin or spec.tier in who.forced_tiers):
            raise ApiError(
                403, "forbidden", f"tenant {who.tenant_name!r} may not force tier {spec.tier!r}", field=field(i, "tier")
            )
        if spec.webhook_url is not None and (host := webhook_host(spec.webhook_url)) not in who.webhook_hosts:
            raise ApiError(
                403,
                "forbidden",
                f"tenant {who.tenant_name!r} may not send webhooks to {host!r} "
                "(an operator lists its hosts: routet2i tenant webhooks)",
                field=field(i, "webhook_url"),
            )
        if spec.idempotency_key is not None:
            name = field(i, "idempotency_key")
            if "\x00" in spec.idempotency_key:  # an Idempotency-Key header (the body's field is validated)
                raise ApiError(422, "invalid_request", f"{name}: must not contain NUL characters", field=name)
            if spec.idempotency_key in keys:
                raise ApiError(
                    422,
                    "invalid_request",
                    f"{name}: repeats {field(keys[spec.idempotency_key], 'idempotency_key')}",
                    field=name,
                )
            keys[spec.idempotency_key] = i
    return keys


def _insert(
    specs: Sequence[JobCreateBase], keys: dict[str, int], field: Callable[[int, str], str]
) -> list[tuple[Job, bool]]:
    """Create the jobs whose idempotency key is new, in one transaction; the others are their earlier jobs."""
    who = principal()
    now = utcnow()
    with transaction(state().sessions) as session:
        existing = get_jobs_by_idempotency_keys(session, tenant_id=who.tenant_id, keys=list(keys)) if keys else {}
        replays: dict[int, Job] = {}
        for i, spec in enumerate(specs):
            earlier = existing.get(spec.idempotency_key) if spec.idempotency_key is not None else None
            if earlier is not None:
                replays[i] = _check_replay(earlier, spec, field=field(i, "idempotency_key"))
        new = iter(
            create_jobs(
                session,
                tenant_id=who.tenant_id,
                jobs=[
                    NewJob(
                        prompt=spec.prompt,
                        seed=spec.seed if spec.seed is not None else secrets.randbelow(MAX_SEED),
                        steps=spec.steps,
                        width=spec.width,
                        height=spec.height,
                        idempotency_key=spec.idempotency_key,
                        requested_tier=spec.tier,
                        deadline_at=now + timedelta(seconds=spec.deadline_s) if spec.deadline_s else None,
                        webhook_url=spec.webhook_url,
                    )
                    for i, spec in enumerate(specs)
                    if i not in replays
                ],
            )
        )
        return [(replays[i], False) if i in replays else (next(new), True) for i in range(len(specs))]


def _enqueue(created: Sequence[Job]) -> None:
    """Publish new jobs to the route queue: one message per router batch, all in one round trip to the broker.
    If the broker cannot take them, they are failed (never left hanging) and the caller gets a 503."""
    st = state()
    try:
        ids = [str(job.id) for job in created]
        publish_many(st.celery, [(ROUTE_TASK, chunk, {}) for chunk in chunks(ids, st.settings.route_batch)])
    except BROKER_ERRORS as exc:
        log.error(
            "broker unavailable, failing jobs", extra={"job_ids": [str(j.id) for j in created], "error": str(exc)}
        )
        with transaction(st.sessions) as session:
            for job in created:
                row = get_job(session, job.id, for_update=True)
                if row is not None and not is_done(row):
                    fail(session, row, f"broker unavailable: {exc}", detail={"stage": "enqueue"})
        raise ApiError(
            503,
            "broker_unavailable",
            "the job queue is unavailable; "
            + ("the job was not started" if len(created) == 1 else f"the {len(created)} new jobs were not started"),
            headers={"Retry-After": "5"},
        ) from exc


def _check_replay(job: Job, spec: JobCreateBase, *, field: str = "idempotency_key") -> Job:
    if not _same_request(job, spec):
        raise ApiError(
            409,
            "idempotency_conflict",
            f"{field} was already used for a different request",
            field=field,
            job_id=str(job.id),
        )
    return job


@blueprint.post("/v1/jobs")
@documented(
    summary="Submit a prompt as a job",
    tag="jobs",
    body=lambda st: st.job_create_model,
    responses={202: ("The job was accepted.", JobAccepted), 200: ("The idempotency key's earlier job.", JobAccepted)},
    extra_errors=(403, 409, 429),
)
def create() -> Any:
    """Submit a prompt. 202 with the new job; 200 with the earlier job when the idempotency key repeats."""
    spec: JobCreateBase = parse_body(state().job_create_model)
    header_key = request.headers.get("Idempotency-Key")
    if header_key is not None:
        if spec.idempotency_key is not None and spec.idempotency_key != header_key:
            raise ApiError(
                422,
                "invalid_request",
                "Idempotency-Key header and idempotency_key field differ",
                field="idempotency_key",
            )
        if not 1 <= len(header_key) <= 255:
            raise ApiError(
                422, "invalid_request", "Idempotency-Key must be 1 to 255 characters", field="idempotency_key"
            )
        spec = spec.model_copy(update={"idempotency_key": header_key})
    job, created = submit_job(spec)
    return _accepted(job, 202 if created else 200)


@blueprint.post("/v1/jobs/batch")
@documented(
    summary="Submit several prompts as jobs in one request",
    tag="jobs",
    body=lambda st: st.job_batch_model,
    responses={
        202: ("The jobs were accepted (items whose idempotency key repeats are the earlier jobs).", JobBatchAccepted),
        200: ("Every item's idempotency key repeats: the earlier jobs.", JobBatchAccepted),
    },
    extra_errors=(403, 409, 429),
)
def create_batch() -> Any:
    """Submit up to 100 prompts at once: one transaction and one broker connection for all of them.

    All or nothing: if any job is refused (validation, a forced tier, an idempotency conflict, the rate limit,
    which counts every job), none is created, and the error names the job's field (``jobs.3.prompt``).
    """
    batch: JobBatchCreateBase = parse_body(state().job_batch_model)
    if request.headers.get("Idempotency-Key") is not None:
        raise ApiError(
            422,
            "invalid_request",
            "a batch takes an idempotency_key per job, not an Idempotency-Key header",
            field="idempotency_key",
        )
    results = submit_jobs(batch.jobs, field_prefix="jobs")
    body = JobBatchAccepted(
        items=[
            JobBatchItem(id=job.id, url=job_url(job.id), status=job.status, created=created)  # type: ignore[arg-type]
            for job, created in results
        ]
    )
    return jsonify(body.model_dump(mode="json")), 202 if any(created for _, created in results) else 200


@blueprint.get("/v1/jobs/<job_id>")
@documented(
    summary="A job with its history, decision, result and timings", tag="jobs", responses={200: ("The job.", JobOut)}
)
def get(job_id: str) -> Any:
    """A job with its status history, routing decision, result and timings. A job past its deadline that has
    not ended is expired now, so the status never shows a deadline passed by."""
    st = state()
    with st.sessions() as session:
        job = load_job(session, job_id)
        overdue = job.deadline_at is not None and not is_done(job) and as_utc(job.deadline_at) <= utcnow()
        if not overdue:
            return jsonify(job_document(session, job).model_dump(mode="json"))
    _expire_if_overdue(job.id)
    with st.sessions() as session:
        return jsonify(job_document(session, load_job(session, job_id)).model_dump(mode="json"))


def _expire_if_overdue(job_id: uuid.UUID) -> None:
    st = state()
    with transaction(st.sessions) as session:
        job = get_job(session, job_id, for_update=True)
        held = expire_if_overdue(session, job) if job is not None else None
    if held is not None:
        give_back(st.spend_ledger, *held, job_id=str(job_id))


@blueprint.get("/v1/jobs")
@documented(
    summary="List jobs, newest first", tag="jobs", query=JobListQuery, responses={200: ("One page of jobs.", JobPage)}
)
def index() -> Any:
    """Jobs, newest first, filtered by status and tier, one page at a time."""
    query = parse_query(JobListQuery)
    with state().sessions() as session:
        try:
            page = list_jobs(
                session,
                tenant_id=None if principal().is_admin else principal().tenant_id,
                status=query.status,
                tier=query.tier,
                dead_lettered=query.dead_lettered,
                limit=query.limit,
                cursor=query.cursor,
            )
        except InvalidCursor as exc:
            raise ApiError(400, "invalid_request", str(exc), field="cursor") from exc
        items = [job_out(job, url=job_url(job.id)).model_dump(mode="json", exclude={"events"}) for job in page.items]
    return jsonify({"items": items, "next_cursor": page.next_cursor})


@blueprint.get("/v1/jobs/<job_id>/image")
@documented(
    summary="The delivered image",
    tag="jobs",
    responses={200: ("The PNG.", PNG)},
    extra_errors=(409, 410),
)
def image(job_id: str) -> Any:
    """The delivered PNG. 409 while the job has no image yet."""
    st = state()
    with st.sessions() as session:
        job = load_job(session, job_id)
        generation = primary_generation(session, job_id=job.id)
        if generation is None:
            raise ApiError(
                409,
                "not_ready",
                f"job {job_id} has no image (status: {job.status})",
                field="job_id",
                job_status=job.status,
            )
        path, digest = generation.image_path, generation.image_sha256
    if request.if_none_match.contains(digest):
        return Response(status=304)
    try:
        data = st.images.read(path)
    except FileNotFoundError as exc:
        raise ApiError(410, "gone", f"the image of job {job_id} is no longer stored", field="job_id") from exc
    response = Response(data, mimetype="image/png")
    response.set_etag(digest)
    response.headers["Cache-Control"] = "private, max-age=31536000, immutable"
    return response
