"""The money budget over time with any number of tiers: hold the mean price per image to a budget across router
processes, choosing per prompt among the tiers that are up and affordable.

The rule is :mod:`router.tiers`' (each prompt goes to the tier with the largest predicted utility minus λ times
its price); this module sets λ online, the way :mod:`router.budget` sets the two-tier threshold:

1. **Target.** The budget ``B`` (mean price per image) pushed against the recent error, so overspending is paid
   back and underspending made up: ``B + gain·(B − mean price of the recent decisions)``, within the cheapest
   and the dearest tier's prices.
2. **Multiplier.** λ is the smallest multiplier whose choices over the most recent prompts' utilities (the
   window's last :data:`router.budget.SCORE_HORIZON` share, at least :data:`MIN_UTILITIES`) cost at most the
   target on average (:func:`router.tiers.multiplier_for_budget`). Until that many prompts were seen, the
   router's offline calibration prompts stand in.
3. **Choice.** The tier with the largest utility minus λ·price among those that may take the job now: not
   held out by the caller (a tier whose circuit breaker is open) and, with a spend limit, whose image still fits
   in the period's money. The cheapest tier is always allowed: it is where a job goes when nothing else is.

Each image of a tier above the cheapest reserves its price from the period's spend limit when it is decided, as
with two tiers. With two tiers the deployment keeps :mod:`router.budget`'s controller, whose threshold on the
score is this rule's λ times the price difference (``tests/test_spend.py`` checks that they agree on the
carried logs).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from router.budget import DEFAULT_FEEDBACK_GAIN, SCORE_HORIZON, SHARE_HORIZON, SPEND_TOLERANCE_USD
from router.tiers import check_prices, multiplier_for_budget

MIN_UTILITIES = 20
"""Below this many recent prompts, λ comes from the router's offline calibration prompts."""


@dataclass(frozen=True)
class SpendConfig:
    """Settings of the money budget controller.

    Attributes:
        tiers: tier names, cheapest first.
        prices: price per image of each tier (what the budget counts), cheapest first.
        budget_usd: the mean price per image to hold over the window.
        window: number of consecutive decisions the budget is held over.
        gain: feedback gain on the recent spend error (relative to the budget).
        spend_limit_usd: most money the images decided in one period may reserve (None: no limit).
        reserve_usd: what one image of each tier reserves from the spend limit (None: its price, except the
            cheapest tier's, which reserves nothing: it runs on the deployment's own hardware).
    """

    tiers: tuple[str, ...]
    prices: tuple[float, ...]
    budget_usd: float
    window: int = 500
    gain: float = DEFAULT_FEEDBACK_GAIN
    spend_limit_usd: float | None = None
    reserve_usd: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_prices(self.prices)
        if len(self.tiers) != len(self.prices) or len(set(self.tiers)) != len(self.tiers):
            raise ValueError("tiers and prices must name each tier once, in the same order")
        if self.budget_usd < 0:
            raise ValueError(f"budget_usd must not be negative, got {self.budget_usd}")
        if self.window < 1:
            raise ValueError(f"window must be positive, got {self.window}")
        if self.reserve_usd is not None and len(self.reserve_usd) != len(self.tiers):
            raise ValueError("reserve_usd needs one value per tier")

    @property
    def reserves(self) -> tuple[float, ...]:
        if self.reserve_usd is not None:
            return self.reserve_usd
        return (0.0, *self.prices[1:])

    @property
    def utilities_used(self) -> int:
        """How many of the most recent prompts' utilities λ is set on."""
        return min(self.window, max(MIN_UTILITIES, round(SCORE_HORIZON * self.window)))

    @property
    def decisions_used(self) -> int:
        """How many of the most recent decisions the feedback's mean price is measured over."""
        return max(1, round(SHARE_HORIZON * self.window))

    def affordable(self, tier: int, spent_usd: float) -> bool:
        """Whether one more image of tier ``tier`` (an index) fits in the spend limit after ``spent_usd``."""
        if self.spend_limit_usd is None or self.reserves[tier] <= 0:
            return True
        return spent_usd + self.reserves[tier] <= self.spend_limit_usd + SPEND_TOLERANCE_USD


@dataclass(frozen=True)
class SpendState:
    """Recent history, newest first.

    Attributes:
        prices: the price of each recent decision's tier; at most ``window`` entries.
        utilities: the same prompts' utility vectors (one value per tier); at most ``window`` entries.
        spent_usd: money reserved in the current spend period by every router sharing the limit.
    """

    prices: Sequence[float]
    utilities: Sequence[Sequence[float]]
    spent_usd: float = 0.0


@dataclass(frozen=True)
class TierVerdict:
    """The controller's answer for one prompt.

    Attributes:
        tier: the chosen tier's index (cheapest first).
        multiplier: λ at this moment, in utility per dollar.
        state: a JSON snapshot of the window, for the audit trail.
        reason: one sentence a human can read.
        reserved_usd: money reserved from the spend limit for this image.
    """

    tier: int
    multiplier: float
    state: dict[str, Any]
    reason: str
    reserved_usd: float = 0.0


@dataclass(frozen=True)
class TierRequest:
    """One prompt to decide: its utilities and the tiers that may take it now (None: every tier)."""

    utilities: Sequence[float]
    allowed: Sequence[bool] | None = None
    why_not: dict[int, str] = field(default_factory=dict)
    """Why a tier is not allowed, by index (e.g. ``"circuit breaker open"``), for the decision's reason."""


def decide_tier(
    request: TierRequest, state: SpendState, config: SpendConfig, *, calibration: np.ndarray | None = None
) -> TierVerdict:
    """Decide one prompt against the money budget (see the module's docstring for the three steps)."""
    prices = np.asarray(config.prices)
    recent = list(state.prices)[: config.decisions_used]
    mean_recent = float(np.mean(recent)) if recent else None
    target = config.budget_usd
    if mean_recent is not None:
        target = config.budget_usd + config.gain * (config.budget_usd - mean_recent)
    target = min(max(target, float(prices[0])), float(prices[-1]))

    rows = np.asarray(list(state.utilities)[: config.utilities_used], dtype=np.float64).reshape(-1, len(prices))
    utilities = np.asarray(request.utilities, dtype=np.float64)
    if len(rows) >= MIN_UTILITIES or calibration is None:
        basis, source = (rows if len(rows) else utilities[None, :]), "recent prompts"
    else:
        basis, source = calibration, "offline calibration"
    multiplier = multiplier_for_budget(basis, prices, target)

    net = utilities - multiplier * prices
    allowed = list(request.allowed) if request.allowed is not None else [True] * len(prices)
    excluded: dict[int, str] = {}
    for k in range(len(prices)):
        if not allowed[k]:
            excluded[k] = request.why_not.get(k, "not available")
        elif not config.affordable(k, state.spent_usd):
            excluded[k] = f"spend limit reached (${state.spent_usd:.4f} of ${config.spend_limit_usd:.4f})"
    candidates = [k for k in range(len(prices)) if k not in excluded] or [0]
    chosen = max(candidates, key=lambda k: (net[k], -k))  # the cheapest among equals
    best = int(np.argmax(net))
    reason = (
        f"{config.tiers[chosen]!r}: predicted utility {utilities[chosen]:.4g} − λ {multiplier:.4g} × "
        f"${prices[chosen]:.4g} is the highest"
    )
    if best != chosen:
        reason += f" of the tiers allowed ({config.tiers[best]!r} would be higher: {excluded.get(best, 'held out')})"
    snapshot: dict[str, Any] = {
        "budget_usd_per_image": config.budget_usd,
        "window": config.window,
        "recent_decisions": len(state.prices),
        "recent_mean_usd": None if mean_recent is None else round(mean_recent, 6),
        "target_usd": round(target, 6),
        "multiplier": multiplier,
        "multiplier_source": source,
        "utilities": {t: round(float(u), 6) for t, u in zip(config.tiers, utilities, strict=True)},
        "excluded": {config.tiers[k]: why for k, why in excluded.items()},
    }
    reserved = config.reserves[chosen] if config.spend_limit_usd is not None else 0.0
    if config.spend_limit_usd is not None:
        snapshot |= {"spent_usd": round(state.spent_usd, 6), "spend_limit_usd": config.spend_limit_usd}
        if reserved:
            snapshot["reserved_usd"] = reserved
    return TierVerdict(chosen, multiplier, snapshot, reason, reserved_usd=reserved)


def advance(state: SpendState, verdict: TierVerdict, request: TierRequest, config: SpendConfig) -> SpendState:
    """The window after ``verdict`` on ``request`` was recorded (newest first, at most ``window`` entries)."""
    window = config.window
    return SpendState(
        prices=(config.prices[verdict.tier], *state.prices[: window - 1]),
        utilities=(tuple(float(u) for u in request.utilities), *state.utilities[: window - 1]),
        spent_usd=state.spent_usd + verdict.reserved_usd,
    )


class SpendStore(Protocol):
    """Holds a :class:`SpendState` and applies decisions to it atomically."""

    def transact(
        self, fn: Callable[[SpendState], Sequence[TierVerdict]], entries: Callable[[Sequence[TierVerdict]], list[str]]
    ) -> list[TierVerdict]:
        """Run ``fn`` on the current state and record its verdicts (oldest first), as one atomic step. ``entries``
        turns the verdicts into the window's new entries (:func:`window_entry`)."""
        ...

    def snapshot(self) -> SpendState: ...


def window_entry(price: float, utilities: Sequence[float]) -> str:
    """One decision as the window stores it: ``"<price>|<u_1>,<u_2>,..."``."""
    return f"{float(price)!r}|" + ",".join(repr(float(u)) for u in utilities)


def parse_entries(raws: Sequence[str]) -> tuple[list[float], list[tuple[float, ...]]]:
    """The prices and utility vectors of stored window entries."""
    prices, utilities = [], []
    for raw in raws:
        price, _, rest = raw.partition("|")
        prices.append(float(price))
        utilities.append(tuple(float(u) for u in rest.split(",")))
    return prices, utilities


class MemorySpendStore:
    """In-process store: one router process, tests, and offline replay."""

    def __init__(self, window: int) -> None:
        self._entries: deque[str] = deque(maxlen=window)
        self._spent_usd = 0.0
        self._lock = threading.Lock()

    def transact(
        self, fn: Callable[[SpendState], Sequence[TierVerdict]], entries: Callable[[Sequence[TierVerdict]], list[str]]
    ) -> list[TierVerdict]:
        with self._lock:
            verdicts = list(fn(self.snapshot()))
            for entry in entries(verdicts):
                self._entries.appendleft(entry)
            self._spent_usd += sum(v.reserved_usd for v in verdicts)
            return verdicts

    def snapshot(self) -> SpendState:
        prices, utilities = parse_entries(list(self._entries))
        return SpendState(prices=prices, utilities=utilities, spent_usd=self._spent_usd)


class SpendController:
    """Decides prompts against a money budget held in a :class:`SpendStore`, a batch at a time."""

    def __init__(
        self, config: SpendConfig, store: SpendStore, *, name: str = "default", calibration: np.ndarray | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.name = name
        self.calibration = calibration

    def decide_many(self, requests: Sequence[TierRequest]) -> list[TierVerdict]:
        """Decide ``requests`` in order, each seeing the decisions before it, in one store transaction."""
        if not requests:
            return []

        def decide_all(state: SpendState) -> list[TierVerdict]:
            verdicts = []
            for request in requests:
                verdict = decide_tier(request, state, self.config, calibration=self.calibration)
                verdicts.append(verdict)
                state = advance(state, verdict, request, self.config)
            return verdicts

        def entries(verdicts: Sequence[TierVerdict]) -> list[str]:
            return [
                window_entry(self.config.prices[v.tier], r.utilities) for v, r in zip(verdicts, requests, strict=True)
            ]

        return self.store.transact(decide_all, entries)
