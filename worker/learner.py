"""``routet2i learn``: the learning loop on a deployment's own labels (router/learning.py holds its rules).

One pass: read the labelled jobs (shadow samples scored on both tiers, oldest first); with no champion yet,
choose the best available prior on the first labels and make it champion; otherwise, once enough new labels
came since the last challenger, train a challenger on all but the most recent labels, judge it against the
champion on those, register it with its verdict and promote it if it wins. Either way, set the shadow rate the
route workers use next: high while labels are few or the champion's predictions are poor, lower as it settles.
Route workers pick up a new champion within ``router_refresh_s``, without a restart.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from db.labels import labelled_log_records
from db.redis_state import set_shadow_rate
from db.registry import CHALLENGER, NewModel, champion, latest_trained, prior_of, promote, register, unpack
from db.session import transaction
from router.base import Router, create_router, load_router
from router.embeddings import SentenceEncoder
from router.learning import LoopConfig, choose_prior, judge, shadow_rate, split_recent, train_challenger
from router.log import LogRecord
from router.quality_metrics import resolve_metric_set

log = logging.getLogger(__name__)

PRIOR_LABELS = 20
"""Labels the first prior is chosen on."""

RULE = "longest-prompt-first"
"""The prompt rule among the candidate priors (calibrated on the carried PartiPrompts)."""


@dataclass
class LearnReport:
    """What one pass did."""

    slot: str
    labels: int
    action: str
    """``waiting`` (too few labels), ``prior`` (a first champion chosen), ``judged`` (a challenger registered)."""
    reason: str
    verdict: dict[str, Any] | None = None
    model_id: str | None = None
    promoted: bool = False
    shadow_rate: float | None = None
    priors: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


def loop_config(settings: Settings, router: str | None = None) -> LoopConfig:
    return LoopConfig(
        router=router or settings.router,
        promote_on=settings.learn_promote_on,
        min_gain=settings.learn_min_gain,
        promote_z=settings.learn_promote_z,
        noise_z=settings.learn_noise_z,
        warm_start=settings.learn_warm_start,
    )


class Learner:
    """The loop for ``settings.router`` on the settings' database, with ``encoder`` for every router."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        state: redis.Redis,
        encoder: SentenceEncoder,
        *,
        by: str = "routet2i learn",
        router_settings: dict[str, Any] | None = None,
        metric_set: str | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.state = state
        self.encoder = encoder
        self.by = by
        self.slot = settings.model_slot
        self.metric_set = metric_set or resolve_metric_set(settings.scorer.metrics).id
        """The labels learnt from: those scored with this metric set (the scorer's, by default)."""
        self.config = loop_config(settings)
        self.router_settings = router_settings or {}
        """Settings of the challengers' router (e.g. a smaller RouteT2I for a test)."""

    def labels(self) -> list[LogRecord]:
        """Every label scored with the deployment's current metric set, oldest first."""
        with self.sessions() as session:
            return labelled_log_records(session, metric_set=self.metric_set)

    def run_once(self) -> LearnReport:
        records = self.labels()
        with self.sessions() as session:
            current = champion(session, self.slot)
            last = latest_trained(session, self.slot)
            last_labels = last.labels if last is not None else 0
        if current is None:
            report = self._cold_start(records)
        elif len(records) < self.config.min_labels:
            report = LearnReport(
                self.slot,
                len(records),
                "waiting",
                f"{len(records)} labels; a challenger needs {self.config.min_labels}",
            )
        elif len(records) - last_labels < self.settings.learn_retrain_every:
            new = len(records) - last_labels
            report = LearnReport(
                self.slot,
                len(records),
                "waiting",
                f"{new} new labels since the last challenger; the next needs {self.settings.learn_retrain_every}",
            )
        else:
            report = self._challenge(records)
        verdict = report.verdict
        if verdict is None and last is not None and last.evaluation and "comparisons" in last.evaluation:
            verdict = last.evaluation  # a waiting pass keeps the latest verdict's view of the champion's error
        report.shadow_rate = self._set_shadow_rate(len(records), verdict)
        log.info("learning pass", extra=report.to_dict())
        return report

    # --- the steps --------------------------------------------------------------------------------------

    def _cold_start(self, records: list[LogRecord]) -> LearnReport:
        if len(records) < PRIOR_LABELS:
            return LearnReport(
                self.slot,
                len(records),
                "waiting",
                f"{len(records)} labels; the first prior is chosen on {PRIOR_LABELS}",
            )
        candidates = self._candidate_priors()
        first = records[:PRIOR_LABELS]
        best, values = choose_prior(candidates, first, self.settings.cloud_budget, self.config)
        reason = f"prior {best!r} chosen on the first {len(first)} labels ({_values(values)})"
        with tempfile.TemporaryDirectory() as folder:
            router = candidates[best]
            router.save(Path(folder))
            new = NewModel(
                slot=self.slot,
                kind=router.name,
                version=router.version,
                encoder=self.encoder.key if router.uses_encoder else None,
                directory=Path(folder),
                source=f"prior: {best}",
                labels=len(first),
                trained_from=_created(first[0]),
                trained_to=_created(first[-1]),
                evaluation={"prior": best, "values": values, "labels": len(first)},
            )
            with transaction(self.sessions) as session:
                row = register(session, new)
                promote(session, row.id, by=self.by)
                model_id = str(row.id)
        return LearnReport(self.slot, len(records), "prior", reason, model_id=model_id, promoted=True, priors=values)

    def _challenge(self, records: list[LogRecord]) -> LearnReport:
        train, holdout = split_recent(records, self.config)
        with self.sessions() as session:
            current_row = champion(session, self.slot)
            prior_row = prior_of(session, self.slot)
            assert current_row is not None
            current = self._load(current_row.kind, current_row.sha256, current_row.artifact)
            prior = self._load(prior_row.kind, prior_row.sha256, prior_row.artifact) if prior_row else None
        challenger = train_challenger(
            train, self.config, prior=prior, encoder=self.encoder, seed=len(records), **self.router_settings
        )
        verdict = judge(current, challenger, holdout, self.settings.cloud_budget, self.config, trained_on=len(train))
        with tempfile.TemporaryDirectory() as folder:
            challenger.save(Path(folder))
            new = NewModel(
                slot=self.slot,
                kind=challenger.name,
                version=challenger.version,
                encoder=self.encoder.key,
                directory=Path(folder),
                source=f"trained on {len(train)} labels, judged on the {len(holdout)} most recent",
                labels=len(records),
                trained_from=_created(train[0]),
                trained_to=_created(train[-1]),
                evaluation=verdict.to_dict(),
            )
            with transaction(self.sessions) as session:
                row = register(session, new, state=CHALLENGER)
                if verdict.promote:
                    promote(session, row.id, by=self.by)
                model_id = str(row.id)
        return LearnReport(
            self.slot,
            len(records),
            "judged",
            verdict.reason,
            verdict=verdict.to_dict(),
            model_id=model_id,
            promoted=verdict.promote,
        )

    def _candidate_priors(self) -> dict[str, Router]:
        """The routers a deployment can start from: the configured (or shipped) one and the prompt rule."""
        candidates: dict[str, Router] = {}
        try:
            candidates["configured"] = load_router(
                self.settings.router, self.settings.router_model, encoder=self.encoder
            )
        except Exception as exc:  # no shipped artifact for this encoder: the other candidates remain
            log.warning("the configured router is no candidate prior", extra={"error": str(exc)})
        candidates["rule"] = create_router(RULE)
        return candidates

    def _load(self, kind: str, sha256: str, artifact: bytes) -> Router:
        directory = self.settings.cache_dir / "models" / sha256
        if not (directory / "manifest.json").is_file():
            unpack(artifact, directory)
        return load_router(kind, directory, encoder=self.encoder)

    def _set_shadow_rate(self, labels: int, verdict: dict[str, Any] | None) -> float:
        recent_error = None
        if verdict is not None:
            pgr = verdict["comparisons"]["pgr"]
            recent_error = 1.0 - (pgr["challenger"] if verdict["promote"] else pgr["champion"])
        rate = shadow_rate(
            labels,
            max_rate=self.settings.shadow_rate,
            min_rate=min(self.settings.shadow_min_rate, self.settings.shadow_rate),
            settle_labels=self.settings.shadow_settle_labels,
            recent_error=recent_error,
        )
        try:
            set_shadow_rate(self.state, self.slot, rate)
        except redis.RedisError as exc:
            log.warning("shadow rate not recorded", extra={"error": str(exc)})
        return rate


def _created(record: LogRecord) -> datetime | None:
    raw = record.extra.get("created_at")
    return datetime.fromisoformat(str(raw)) if raw else None


def _values(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in values.items())
