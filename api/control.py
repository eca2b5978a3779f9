"""Job control: cancel a job, and see its webhook deliveries."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from api.auth import authenticate
from api.errors import ApiError
from api.jobs import load_job
from api.openapi import documented
from api.state import state
from db.documents import DeliveryPage, JobOut, delivery_out, job_document
from db.lifecycle import CANCELLED, is_done, stop
from db.redis_state import give_back
from db.session import transaction
from db.webhooks import list_deliveries

blueprint = Blueprint("control", __name__)
blueprint.before_request(authenticate)


@blueprint.post("/v1/jobs/<job_id>/cancel")
@documented(
    summary="Cancel a job",
    tag="jobs",
    responses={200: ("The job, cancelled (or already cancelled).", JobOut)},
    extra_errors=(409,),
)
def cancel(job_id: str) -> Any:
    """Cancel a job that has not ended: a queued or routing job never generates; a generating job's image is
    discarded when it is done (billed, as wasted, only where a paid API was already called). Its cloud
    reservation goes back to the spend limit. 409 if the job already ended otherwise."""
    st = state()
    with transaction(st.sessions) as session:
        job = load_job(session, job_id, for_update=True)
        held = None
        if job.status != CANCELLED:
            if is_done(job):
                raise ApiError(
                    409,
                    "already_ended",
                    f"job {job_id} already ended ({job.status})",
                    field="job_id",
                    job_status=job.status,
                )
            held = stop(session, job, CANCELLED, "cancelled by the client")
    if held is not None:
        give_back(st.spend_ledger, *held, job_id=str(job.id))
    with st.sessions() as session:
        return jsonify(job_document(session, load_job(session, job_id)).model_dump(mode="json"))


@blueprint.get("/v1/jobs/<job_id>/deliveries")
@documented(
    summary="A job's webhook deliveries, with every attempt",
    tag="jobs",
    responses={200: ("The deliveries, oldest first.", DeliveryPage)},
)
def deliveries(job_id: str) -> Any:
    """Each terminal state posted (or to post) to the job's webhook, with every attempt and the answer it got."""
    with state().sessions() as session:
        job = load_job(session, job_id)
        items = [delivery_out(row) for row in list_deliveries(session, job_id=job.id)]
    return jsonify(DeliveryPage(items=items).model_dump(mode="json"))
