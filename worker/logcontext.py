"""Every log record a task emits carries the job id it works on.

Celery's ``task_prerun`` and ``task_postrun`` signals bracket each task execution in the process that runs
it (the pool child), so binding the job id there also tags Celery's own records for the task (its success
line, retries, errors) as well as the pipeline's.
"""

from __future__ import annotations

from contextvars import Token
from typing import Any

from celery.signals import task_postrun, task_prerun

from routet2i.logs import bind, unbind

_tokens: dict[str, Token[dict[str, Any]]] = {}


def _bind(task_id: str, task: Any, args: Any = None, **_: Any) -> None:
    job_id = args[0] if args else None
    _tokens[task_id] = bind(job_id=job_id, task=task.name, task_id=task_id)


def _unbind(task_id: str, **_: Any) -> None:
    token = _tokens.pop(task_id, None)
    if token is not None:
        unbind(token)


def connect_log_context() -> None:
    """Bind ``job_id``, ``task`` and ``task_id`` to the log context of every task this process runs."""
    task_prerun.connect(_bind, weak=False, dispatch_uid="routet2i.logcontext.bind")
    task_postrun.connect(_unbind, weak=False, dispatch_uid="routet2i.logcontext.unbind")
