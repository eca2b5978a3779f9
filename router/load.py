"""Load-aware routing under a latency SLO: the live state of each tier, the wait a new job would see there, and
the plan that moves a batch's jobs off a tier that would miss their SLO.

The router's own decision (the prompt against the budget) comes first; this module only corrects it for load.
It is pure: the live state is read by :mod:`db.load` and the burst allowance is charged there.

**Predicted latency.** A tier with ``slots`` live worker slots, each taking ``service_s`` seconds per image (the
moving median of its recent batches' wall time per image), and ``backlog`` jobs queued or generating, finishes a
job that joins now in about ``max(0, backlog − slots + 1) · service_s / slots + service_s`` seconds (a fluid
queue: the slots drain the jobs ahead in order). A tier whose service time was never measured is not judged
(nothing can be predicted of it); one with no live worker never meets an SLO.

**The plan** for a batch of decisions, each job with the seconds it has left (the SLO minus the time since it
was submitted, or less before its own deadline):

1. Jobs the router sent to a tier above the cheapest, or that the caller forced, or that are shadow-sampled,
   stay where they are and take their place in their tier's queue. (A dearer tier that would miss a fresh job's
   SLO while the cheapest would not is held out before the router decides: :func:`held_out_for_load`.)
2. Jobs the router sent to the cheapest tier join its queue in order of increasing predicted gain, as long as
   the tier still meets each one's SLO: the cheap tier keeps the prompts the dearer tiers would improve least.
3. The rest spill, largest predicted gain first, to the cheapest tier above that meets their SLO, each paid
   from the burst allowance (a separate amount per spend period, inside the spend limit) while it lasts.
4. A job that could not spill is degraded when that makes it meet its SLO: it runs on the cheapest tier with
   ``degrade_steps`` of its steps (a per-job knob; the queue behind it drains faster by as much).
5. Otherwise it is queued on the cheapest tier as decided, and its decision says by how much it will miss.

Below capacity no job is late, so the plan changes nothing: load-aware and load-blind routing decide alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

UNMEASURED = "unmeasured"


@dataclass(frozen=True)
class TierLoad:
    """What one tier is doing now.

    Attributes:
        tier: its name.
        backlog: jobs queued on it or generating there.
        slots: live worker slots consuming its queue (pool processes of live workers).
        service_s: seconds per image of one slot (moving median), None when never measured.
    """

    tier: str
    backlog: float
    slots: int
    service_s: float | None

    def latency_s(self, ahead: float | None = None, *, share: float = 1.0) -> float | None:
        """Predicted seconds from now until a job joining behind ``ahead`` jobs (default: the backlog) is done,
        its own generation taking ``share`` of a full one. None: not predictable (no service time yet)."""
        if self.service_s is None:
            return None
        if self.slots <= 0:
            return math.inf
        ahead = self.backlog if ahead is None else ahead
        return max(0.0, ahead - self.slots + 1) * self.service_s / self.slots + share * self.service_s

    def describe(self) -> dict[str, float | int | str | None]:
        latency = self.latency_s()
        return {
            "backlog": self.backlog,
            "slots": self.slots,
            "service_s": None if self.service_s is None else round(self.service_s, 4),
            "predicted_s": None if latency is None else (round(latency, 3) if math.isfinite(latency) else "inf"),
        }


@dataclass(frozen=True)
class LoadJob:
    """One routed job as the plan sees it.

    Attributes:
        tier: the tier the router chose.
        gains: per tier, the predicted gain of sending the job there rather than to the cheapest (the router's
            score or utility; 0 for the cheapest).
        left_s: seconds it has left before its SLO (or deadline); None: no SLO applies.
        movable: whether the plan may move it (not forced by the caller, not shadow-sampled).
    """

    tier: str
    gains: Mapping[str, float]
    left_s: float | None
    movable: bool = True


@dataclass(frozen=True)
class LoadVerdict:
    """What the plan does with one job.

    Attributes:
        tier: the tier it runs on.
        action: ``kept`` (as routed), ``spilled`` (to ``tier``, paid from the burst allowance), ``degraded``
            (fewer steps on ``tier``), ``late`` (kept: no tier meets its SLO), or ``unjudged`` (no SLO, or a tier
            whose latency cannot be predicted).
        predicted_s: its predicted latency from now where it runs (None: not predictable).
        spill_usd: what its spill costs the allowance.
        steps_share: share of its steps it runs with (1: all).
        reason: one sentence for the audit trail (empty when kept without remark).
    """

    tier: str
    action: str
    predicted_s: float | None = None
    spill_usd: float = 0.0
    steps_share: float = 1.0
    reason: str = ""


@dataclass
class LoadPlan:
    """The verdicts of a batch and what they take from the burst allowance."""

    verdicts: list[LoadVerdict] = field(default_factory=list)

    @property
    def spill_usd(self) -> list[float]:
        """Spill prices in the order they were granted (largest gain first)."""
        return [v.spill_usd for v in self.verdicts if v.action == "spilled"]


def _seconds(value: float | None) -> str:
    return "?" if value is None else ("∞" if math.isinf(value) else f"{value:.1f} s")


def held_out_for_load(loads: Sequence[TierLoad], slo_s: float) -> dict[str, str]:
    """Tiers above the cheapest that would miss a fresh job's SLO while the cheapest would not, with why: the
    router decides as if they were down, so it does not queue jobs on them (the cheapest is never held out)."""
    cheapest = loads[0].latency_s()
    if cheapest is None or cheapest > slo_s:
        return {}
    held = {}
    for load in loads[1:]:
        latency = load.latency_s()
        if latency is not None and latency > slo_s:
            held[load.tier] = (
                f"{load.tier} backlog {load.backlog:g} jobs on {load.slots} slots: {_seconds(latency)} > SLO "
                f"{slo_s:g} s"
            )
    return held


def plan(
    jobs: Sequence[LoadJob],
    loads: Sequence[TierLoad],
    *,
    prices: Mapping[str, float],
    allowance_usd: float,
    degrade_steps: float,
    held_out: Mapping[str, str] | None = None,
) -> LoadPlan:
    """Correct a batch of routing decisions for load (the module's rules, in order).

    Args:
        jobs: the batch's decisions, in the order the router took them.
        loads: every tier's live state, cheapest first.
        prices: price per image of each tier.
        allowance_usd: what the burst allowance has left for this batch.
        degrade_steps: share of steps a degraded job runs with (0: no degrading).
        held_out: tiers that may not take jobs now (breaker open, or held out for load).
    """
    by_tier = {load.tier: load for load in loads}
    cheapest = loads[0].tier
    ahead = {load.tier: float(load.backlog) for load in loads}
    verdicts: list[LoadVerdict | None] = [None] * len(jobs)
    held = held_out or {}
    for i, job in enumerate(jobs):  # rule 1
        if job.tier != cheapest or not job.movable:
            verdicts[i] = _join(by_tier[job.tier], ahead, job)
    edge = sorted((i for i in range(len(jobs)) if verdicts[i] is None), key=lambda i: _best_gain(jobs[i], cheapest))
    late: list[int] = []
    for i in edge:  # rule 2
        latency = by_tier[cheapest].latency_s(ahead[cheapest])
        left = jobs[i].left_s
        if left is None or latency is None or latency <= left:
            verdicts[i] = _join(by_tier[cheapest], ahead, jobs[i])
        else:
            late.append(i)
    left_usd = allowance_usd
    for i in sorted(late, key=lambda i: -_best_gain(jobs[i], cheapest)):  # rules 3 to 5
        job = jobs[i]
        assert job.left_s is not None
        target = _spill_target(job, loads[1:], ahead, held)
        if target is not None and prices[target] <= left_usd + 1e-12:
            left_usd -= prices[target]
            latency = by_tier[target].latency_s(ahead[target])
            ahead[target] += 1
            lateness = by_tier[cheapest].latency_s(ahead[cheapest])
            verdicts[i] = LoadVerdict(
                target,
                "spilled",
                latency,
                spill_usd=prices[target],
                reason=f"{cheapest} backlog {ahead[cheapest]:g} jobs: {_seconds(lateness)} > {job.left_s:.1f} s left "
                f"of the SLO: spilled to {target} ({_seconds(latency)})",
            )
            continue
        why = "burst allowance spent" if target is not None else "no other tier meets it"
        verdicts[i] = _degrade_or_queue(by_tier[cheapest], ahead, job, degrade_steps, why)
    return LoadPlan([v for v in verdicts if v is not None])


def _join(load: TierLoad, ahead: dict[str, float], job: LoadJob) -> LoadVerdict:
    """The job takes its place in ``load``'s queue, as routed."""
    latency = load.latency_s(ahead[load.tier])
    ahead[load.tier] += 1
    if job.left_s is None or latency is None:
        return LoadVerdict(load.tier, "unjudged", latency)
    if latency > job.left_s:
        return LoadVerdict(
            load.tier, "late", latency, reason=f"{load.tier}: {_seconds(latency)} > {job.left_s:.1f} s left of the SLO"
        )
    return LoadVerdict(load.tier, "kept", latency)


def _best_gain(job: LoadJob, cheapest: str) -> float:
    return max((gain for tier, gain in job.gains.items() if tier != cheapest), default=0.0)


def _spill_target(
    job: LoadJob, dearer: Sequence[TierLoad], ahead: Mapping[str, float], held: Mapping[str, str]
) -> str | None:
    """The cheapest tier above the cheapest that may take the job and meets its SLO."""
    assert job.left_s is not None
    for load in dearer:
        latency = load.latency_s(ahead[load.tier])
        if load.tier not in held and latency is not None and latency <= job.left_s:
            return load.tier
    return None


def _degrade_or_queue(
    load: TierLoad, ahead: dict[str, float], job: LoadJob, degrade_steps: float, why: str
) -> LoadVerdict:
    """Rules 4 and 5 on the cheapest tier ``load``."""
    assert job.left_s is not None
    if degrade_steps > 0:
        latency = load.latency_s(ahead[load.tier], share=degrade_steps)
        if latency is not None and latency <= job.left_s:
            ahead[load.tier] += degrade_steps
            return LoadVerdict(
                load.tier,
                "degraded",
                latency,
                steps_share=degrade_steps,
                reason=f"{load.tier} late and {why}: {degrade_steps:g} of its steps meets the SLO "
                f"({_seconds(latency)} ≤ {job.left_s:.1f} s)",
            )
    latency = load.latency_s(ahead[load.tier])
    ahead[load.tier] += 1
    return LoadVerdict(
        load.tier,
        "late",
        latency,
        reason=f"no tier meets the SLO ({why}): queued on {load.tier}, {_seconds(latency)} > {job.left_s:.1f} s left",
    )
