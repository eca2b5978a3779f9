"""The cloud budget over time: hold the share of cloud-routed requests to ρ across router processes.

Offline, a router's threshold is a quantile of its scores on a log. Online, requests arrive one at a time and
the score distribution drifts, so the threshold is re-estimated from the most recent scores and corrected by
how far the recent cloud share is from ρ; a hard cap then guarantees that no window of ``window`` consecutive
decisions holds more than ``floor(ρ·window)`` cloud decisions, and a minimum that none holds fewer than
``floor((ρ − tolerance)·window)`` while requests the router rates above its edge floor keep coming.
Optionally, a spend limit in money per period also holds: each cloud image reserves its price from the
period's limit when it is decided, and a request for which the period has no money left goes to the edge,
whatever its share.

The algorithm is pure (:func:`decide`); where its state lives is a :class:`BudgetStore`. The Redis store that
several router workers share lives in :mod:`db.redis_state`.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from router.cost import reserved_usd
from router.types import BudgetVerdict

if TYPE_CHECKING:
    from core.settings import Settings

DEFAULT_FEEDBACK_GAIN = 4.0
"""How strongly the target share is pushed against the recent error (ρ − recent share), so shortfalls are made
up. In ``ops/eval/budget_study.py`` (window 500) gains 1, 2 and 4 sent nearly the same value on shuffled
traffic, and gain 4 the most when traffic drifts by category (0.940 of the best ρ share's scores at ρ 0.3,
against 0.931 at gain 2 and 0.924 at gain 1)."""

DEFAULT_TOLERANCE = 0.02
"""How far below ρ a window's cloud share may fall before requests are sent to the cloud whatever their score
(above the edge floor): the share stays within ρ − 3 points with a point to spare for requests that the
floor keeps on the edge when the minimum needs them (at 0.025, windows of 100 fell to ρ − 4 points)."""

SCORE_HORIZON = 0.4
"""Share of the window whose most recent scores set the threshold's quantile: after the score distribution
shifts, the threshold follows within this many requests instead of a whole window."""

SHARE_HORIZON = 0.2
"""Share of the window over which the recent cloud share is measured for the feedback: a shortfall shows
within this many requests, before the window's minimum has to step in."""

MIN_SCORES_FOR_QUANTILE = 20
"""Below this many recent scores the threshold comes from the router's offline calibration."""

SPEND_TOLERANCE_USD = 1e-9
"""Rounding slack when a reservation exactly reaches the spend limit (sums of float prices)."""

ShadowPayment = Literal["window", "allowance"]
SHADOW_PAYMENTS: tuple[ShadowPayment, ...] = ("window", "allowance")
"""Where a shadow sample's cloud image is paid from (``ROUTET2I_SHADOW_PAID_FROM``): ``window``: from ρ, as a
routed cloud image, so an edge-routed request is shadow-sampled only when the window has room for it;
``allowance``: beside ρ, as escalations are, from the spend limit alone, taking no place in the window. A
deployment's default is ``allowance`` (:class:`core.settings.Settings`); a :class:`BudgetConfig` built by hand
pays from the ``window`` unless told otherwise."""


@dataclass(frozen=True)
class BudgetConfig:
    """Settings of the budget controller.

    Attributes:
        rho: largest share of requests that may go to the cloud.
        window: number of consecutive decisions the share is held over (and the score history length).
        gain: feedback gain on the recent share error.
        tolerance: no window holds fewer than ``floor((ρ − tolerance)·window)`` cloud decisions (nor the first
            decisions a smaller share than ρ − tolerance): below that, a request goes to the cloud whatever its
            score, unless the router's edge floor or the spend limit keeps it on the edge (1: no minimum).
        score_horizon: most recent scores whose quantile is the threshold (None: :data:`SCORE_HORIZON` of the
            window, at least :data:`MIN_SCORES_FOR_QUANTILE`).
        share_horizon: most recent decisions whose cloud share the feedback corrects (None:
            :data:`SHARE_HORIZON` of the window).
        spend_limit_usd: most money the cloud images decided in one period may cost (None: no limit). The
            period and the running total live in the store (:attr:`BudgetState.spent_usd`).
        cloud_cost_usd: money one cloud image reserves from the spend limit when it is decided.
        shadow_paid_from: where a shadow sample's cloud image is paid from (:data:`SHADOW_PAYMENTS`).
    """

    rho: float
    window: int = 500
    gain: float = DEFAULT_FEEDBACK_GAIN
    tolerance: float = DEFAULT_TOLERANCE
    score_horizon: int | None = None
    share_horizon: int | None = None
    spend_limit_usd: float | None = None
    cloud_cost_usd: float = 0.0
    shadow_paid_from: ShadowPayment = "window"

    def __post_init__(self) -> None:
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"rho must be within [0, 1], got {self.rho}")
        if self.window < 1:
            raise ValueError(f"window must be positive, got {self.window}")
        if self.spend_limit_usd is not None and self.spend_limit_usd < 0:
            raise ValueError(f"spend_limit_usd must not be negative, got {self.spend_limit_usd}")
        if self.cloud_cost_usd < 0:
            raise ValueError(f"cloud_cost_usd must not be negative, got {self.cloud_cost_usd}")
        if not 0.0 <= self.tolerance <= 1.0:
            raise ValueError(f"tolerance must be within [0, 1], got {self.tolerance}")
        if self.shadow_paid_from not in SHADOW_PAYMENTS:
            raise ValueError(f"shadow_paid_from must be one of {SHADOW_PAYMENTS}, got {self.shadow_paid_from!r}")
        for name in ("score_horizon", "share_horizon"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= self.window:
                raise ValueError(f"{name} must be within 1..window ({self.window}), got {value}")

    @classmethod
    def for_settings(cls, settings: Settings, rho: float, *, tolerance: float | None = None) -> BudgetConfig:
        """A deployment's budget held to ``rho`` over its window, and to its spend limit when one is set, with
        every cloud image reserving the cloud tier's price per image, and shadow samples paid as the deployment
        says (``shadow_paid_from``); ``tolerance``: the window's minimum share (None: the deployment's
        ``budget_tolerance``; 1: none)."""
        return cls(
            rho=rho,
            window=settings.budget_window,
            tolerance=settings.budget_tolerance if tolerance is None else tolerance,
            spend_limit_usd=settings.cloud_spend_limit_usd,
            cloud_cost_usd=reserved_usd(settings.tier(settings.dearest)),
            shadow_paid_from=settings.shadow_paid_from,
        )

    def affordable(self, spent_usd: float) -> bool:
        """Whether one more cloud image fits in the spend limit after ``spent_usd`` this period."""
        if self.spend_limit_usd is None:
            return True
        return spent_usd + self.cloud_cost_usd <= self.spend_limit_usd + SPEND_TOLERANCE_USD

    @property
    def cap(self) -> int:
        """Most cloud decisions allowed in any ``window`` consecutive decisions."""
        return math.floor(self.rho * self.window + 1e-9)

    @property
    def minimum(self) -> int:
        """Fewest cloud decisions a full window holds while the router rates requests above its edge floor."""
        return self.minimum_of(self.window)

    def minimum_of(self, decisions: int) -> int:
        """Fewest cloud decisions among the last ``decisions`` (at most ``window``; fewer during the first
        window, whose share so far is held as well)."""
        return max(0, math.floor((self.rho - self.tolerance) * decisions + 1e-9))

    @property
    def scores_used(self) -> int:
        """How many of the most recent scores the threshold's quantile is taken over."""
        if self.score_horizon is not None:
            return self.score_horizon
        return min(self.window, max(MIN_SCORES_FOR_QUANTILE, round(SCORE_HORIZON * self.window)))

    @property
    def decisions_used(self) -> int:
        """How many of the most recent decisions the feedback's cloud share is measured over."""
        if self.share_horizon is not None:
            return self.share_horizon
        return max(1, round(SHARE_HORIZON * self.window))


@dataclass(frozen=True)
class BudgetState:
    """Recent history, newest first.

    Attributes:
        decisions: 1 for a cloud image in the window (delivered, or a shadow paid from ρ), else 0; at most
            ``window`` entries.
        scores: router scores of the same requests; at most ``window`` entries.
        spent_usd: money reserved (and billed beyond the reservations) for cloud images in the current spend
            period, by every router sharing the spend limit.
    """

    decisions: Sequence[int]
    scores: Sequence[float]
    spent_usd: float = 0.0


class Indexable(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


def sorted_quantile(ordered: Indexable, q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of values already sorted in ascending order (a list or
    a numpy array): a calibration asked for its threshold at every decision is sorted once, not per call."""
    if not len(ordered):
        raise ValueError("quantile of an empty sequence")
    position = min(max(q, 0.0), 1.0) * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    below, above = float(ordered[low]), float(ordered[high])
    return below + (above - below) * (position - low)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy."""
    return sorted_quantile(sorted(values), q)


def decide(
    score: float,
    state: BudgetState,
    config: BudgetConfig,
    *,
    floor: float | None = None,
    calibrated_threshold: float | None = None,
    shadow: bool = False,
) -> BudgetVerdict:
    """Decide one request against the budget.

    Args:
        score: the router's expected cloud advantage for this request.
        state: recent decisions and scores (newest first), shared by all router processes.
        config: ρ, window and gain.
        floor: scores at or below it never go to the cloud (RouteT2I's α ≤ ½ rule), whatever the budget.
        calibrated_threshold: threshold from offline calibration, used until enough scores were seen.
        shadow: the request was sampled to run on both tiers. Routed to the edge, it is shadowed only if its
            cloud image can be paid: from ρ (``config.shadow_paid_from`` ``window``: the window must have room
            for it, as for a routed one) or beside it (``allowance``: the spend limit alone; the image takes no
            place in the window); either way within the spend limit.

    Returns:
        The verdict with the threshold used and a snapshot of the window for the audit trail.
    """
    recent = list(state.decisions)[: config.window - 1]
    cloud_recent = sum(recent)
    horizon = recent[: config.decisions_used]
    share = sum(horizon) / len(horizon) if horizon else 0.0
    # While fewer than `window` decisions exist, the share so far is held to ρ as well, so a cold start
    # cannot spend the whole window's budget on its first requests.
    cap_now = min(config.cap, math.floor(config.rho * (len(recent) + 1) + 1e-9))
    # Nor below its minimum share (the share so far, during the first `window` decisions): the decisions
    # so far and this one are the window that ends here.
    minimum = config.minimum_of(len(recent) + 1)

    # 1. Target share for this request: ρ pushed against the recent error, so shortfalls are made up.
    target = min(max(config.rho + config.gain * (config.rho - share), 0.0), 1.0) if recent else config.rho

    # 2. Threshold: the (1 - target) quantile of recent scores, i.e. the top `target` share goes to the cloud.
    threshold: float | None
    scores = list(state.scores)[: config.scores_used]
    if len(scores) >= MIN_SCORES_FOR_QUANTILE or (calibrated_threshold is None and scores):
        threshold = quantile(scores, 1.0 - target)
        source = "recent scores"
    else:
        threshold = calibrated_threshold
        source = "offline calibration" if threshold is not None else "none"

    snapshot: dict[str, Any] = {
        "rho": config.rho,
        "window": config.window,
        "recent_decisions": len(recent),
        "recent_cloud": cloud_recent,
        "recent_cloud_share": round(share, 6),
        "target_share": round(target, 6),
        "cap": cap_now,
        "minimum": minimum,
        "threshold_source": source,
    }
    if config.spend_limit_usd is not None:
        snapshot["spent_usd"] = round(state.spent_usd, 6)
        snapshot["spend_limit_usd"] = config.spend_limit_usd

    # 3. The hard constraints, in order of precedence, then the threshold.
    verdict = _route(
        score, config, cloud_recent, len(recent), cap_now, minimum, threshold, snapshot, floor, state.spent_usd
    )
    # 4. Shadow sampling: run the request on both tiers if its cloud image can be paid for.
    if shadow:
        verdict = _shadow(
            verdict, config, room=config.cap > 0 and cloud_recent + 1 <= cap_now, spent_usd=state.spent_usd
        )
    # 5. A cloud image (delivered or shadow) reserves its price from the period's spend limit.
    if verdict.uses_cloud and config.spend_limit_usd is not None:
        verdict = replace(
            verdict, reserved_usd=config.cloud_cost_usd, state={**verdict.state, "reserved_usd": config.cloud_cost_usd}
        )
    return verdict


def _shadow(verdict: BudgetVerdict, config: BudgetConfig, *, room: bool, spent_usd: float) -> BudgetVerdict:
    """``verdict`` for a request sampled to run on both tiers: routed to the cloud, its shadow is the edge's;
    routed to the edge, its cloud image is paid from ρ (only with ``room`` in the window) or beside it (without
    a place in the window), within the spend limit either way."""
    if verdict.cloud:
        return replace(verdict, shadow=True, reason=verdict.reason + "; shadow-sampled on the edge too")
    if config.shadow_paid_from == "allowance":
        if not config.affordable(spent_usd):
            return replace(verdict, reason=verdict.reason + "; the spend limit leaves nothing to shadow-sample")
        return replace(
            verdict,
            shadow=True,
            shadow_beside=True,
            state={**verdict.state, "shadow_paid_from": "allowance"},
            reason=verdict.reason + "; shadow-sampled on the cloud too, paid beside the routing budget",
        )
    if room and config.affordable(spent_usd):
        return replace(verdict, shadow=True, reason=verdict.reason + "; shadow-sampled on the cloud too")
    return replace(verdict, reason=verdict.reason + "; no budget left to shadow-sample")


def _route(
    score: float,
    config: BudgetConfig,
    cloud_recent: int,
    n_recent: int,
    cap_now: int,
    minimum: int,
    threshold: float | None,
    snapshot: dict[str, Any],
    floor: float | None,
    spent_usd: float,
) -> BudgetVerdict:
    if config.cap == 0:
        return BudgetVerdict(False, threshold, snapshot, "cloud budget is zero")
    if floor is not None and score <= floor:
        return BudgetVerdict(False, threshold, snapshot, "edge is predicted at least as good as the cloud")
    if cloud_recent + 1 > cap_now:
        return BudgetVerdict(
            False,
            threshold,
            snapshot,
            f"budget full: {cloud_recent} of the last {n_recent} went to the cloud",
        )
    if threshold is not None and score > threshold:
        reason = f"score {score:.4g} above threshold {threshold:.4g}"
    elif cloud_recent < minimum:  # the window ending here would fall below its minimum without this request
        below = "no threshold yet" if threshold is None else f"score {score:.4g} at or below threshold {threshold:.4g}"
        reason = (
            f"{below}, but {cloud_recent} of the last {n_recent} went to the cloud and the {n_recent + 1} "
            f"decisions ending here hold at least {minimum}"
        )
    elif threshold is None:
        return BudgetVerdict(False, None, snapshot, "no score history or calibration yet; edge until there is")
    else:
        return BudgetVerdict(False, threshold, snapshot, f"score {score:.4g} at or below threshold {threshold:.4g}")
    # Last, so that this reason names exactly the requests the cloud would have taken but the money could not.
    if not config.affordable(spent_usd):
        return BudgetVerdict(
            False,
            threshold,
            snapshot,
            f"{reason}, but the spend limit is reached: "
            f"${spent_usd:.4f} of ${config.spend_limit_usd:.4f} spent this period",
        )
    return BudgetVerdict(True, threshold, snapshot, reason)


@dataclass(frozen=True)
class BudgetRequest:
    """One request to decide against the budget (the keyword arguments of :func:`decide`)."""

    score: float
    floor: float | None = None
    calibrated_threshold: float | None = None
    shadow: bool = False


def advance(state: BudgetState, verdict: BudgetVerdict, score: float, window: int) -> BudgetState:
    """The window after ``verdict`` on ``score`` was recorded (newest first, at most ``window`` entries)."""
    return BudgetState(
        decisions=(1 if verdict.in_window else 0, *state.decisions[: window - 1]),
        scores=(float(score), *state.scores[: window - 1]),
        spent_usd=state.spent_usd + verdict.reserved_usd,
    )


class BudgetStore(Protocol):
    """Holds a :class:`BudgetState` and applies decisions to it atomically."""

    def transact(
        self, fn: Callable[[BudgetState], Sequence[BudgetVerdict]], scores: Sequence[float]
    ) -> list[BudgetVerdict]:
        """Run ``fn`` on the current state and record its verdicts (oldest first) with ``scores``, as one
        atomic step: no other decision comes between them."""
        ...

    def snapshot(self) -> BudgetState: ...

    def reset(self) -> None: ...


class MemoryBudgetStore:
    """In-process store: one router process, tests, and offline replay."""

    def __init__(self, window: int) -> None:
        self._decisions: deque[int] = deque(maxlen=window)
        self._scores: deque[float] = deque(maxlen=window)
        self._spent_usd = 0.0  # one spend period: the store's lifetime
        self._lock = threading.Lock()

    def transact(
        self, fn: Callable[[BudgetState], Sequence[BudgetVerdict]], scores: Sequence[float]
    ) -> list[BudgetVerdict]:
        with self._lock:
            verdicts = list(fn(self.snapshot()))
            for verdict, score in zip(verdicts, scores, strict=True):
                self._decisions.appendleft(1 if verdict.in_window else 0)
                self._scores.appendleft(float(score))
                self._spent_usd += verdict.reserved_usd
            return verdicts

    def snapshot(self) -> BudgetState:
        return BudgetState(decisions=tuple(self._decisions), scores=tuple(self._scores), spent_usd=self._spent_usd)

    def reset(self) -> None:
        with self._lock:
            self._decisions.clear()
            self._scores.clear()
            self._spent_usd = 0.0


class BudgetController:
    """Decides requests against a budget held in a :class:`BudgetStore`, one at a time or several at once."""

    def __init__(self, config: BudgetConfig, store: BudgetStore, *, name: str = "default") -> None:
        self.config = config
        self.store = store
        self.name = name

    def decide(
        self,
        score: float,
        *,
        floor: float | None = None,
        calibrated_threshold: float | None = None,
        shadow: bool = False,
    ) -> BudgetVerdict:
        return self.decide_many([BudgetRequest(score, floor, calibrated_threshold, shadow)])[0]

    def decide_many(self, requests: Sequence[BudgetRequest]) -> list[BudgetVerdict]:
        """Decide ``requests`` in order, each seeing the decisions before it, in one store transaction (a
        router worker's batch costs one round trip to the shared window, not one per job).

        Returns:
            One verdict per request, in order.
        """
        if not requests:
            return []

        def decide_all(state: BudgetState) -> list[BudgetVerdict]:
            verdicts = []
            for request in requests:
                verdict = decide(
                    request.score,
                    state,
                    self.config,
                    floor=request.floor,
                    calibrated_threshold=request.calibrated_threshold,
                    shadow=request.shadow,
                )
                verdicts.append(verdict)
                state = advance(state, verdict, request.score, self.config.window)
            return verdicts

        return self.store.transact(decide_all, [request.score for request in requests])
