"""Values that cross boundaries between the router, the workers, the database and the API.

All are frozen dataclasses with plain-JSON ``to_dict``/``from_dict`` so they can be stored in a JSON column
or sent through a queue without pickling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Tier = Literal["edge", "cloud"]


@dataclass(frozen=True)
class QualityVector:
    """Per-metric quality of one image (or a prediction of it). Higher is better for every metric.

    The same type carries scorer output (CLIP metrics of a generated image), human ratings imported from
    rated data sets, and router predictions, so training, replay and live traffic speak one language.

    Attributes:
        values: metric name -> score.
        metric_set: name and version of the set the metrics come from (e.g. ``"routet2i-v1"``, ``"human"``).
    """

    values: Mapping[str, float]
    metric_set: str = "unspecified"

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", {str(k): float(v) for k, v in self.values.items()})

    def __getitem__(self, metric: str) -> float:
        return self.values[metric]

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"metric_set": self.metric_set, "values": dict(self.values)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QualityVector:
        return cls(values=data["values"], metric_set=data.get("metric_set", "unspecified"))


@dataclass(frozen=True)
class Prediction:
    """What a router concludes about one prompt before any image exists.

    Attributes:
        score: expected advantage of the cloud tier; larger means the cloud is more worth its price.
        edge: predicted quality of the edge tier's image, when the router predicts qualities.
        cloud: predicted quality of the cloud tier's image.
        max_score_for_edge: prompts scoring at or below this never go to the cloud whatever the budget
            (RouteT2I: the edge is predicted at least as good). ``None``: no such floor.
        explanation: why, e.g. the tokens that drove each metric.
        features: the inputs the router looked at, recorded for audit.
    """

    score: float
    edge: QualityVector | None = None
    cloud: QualityVector | None = None
    max_score_for_edge: float | None = None
    explanation: Mapping[str, Any] | None = None
    features: Mapping[str, Any] = field(default_factory=dict)

    def predicted_dict(self) -> dict[str, Any] | None:
        if self.edge is None or self.cloud is None:
            return None
        return {"edge": self.edge.to_dict(), "cloud": self.cloud.to_dict()}


@dataclass(frozen=True)
class BudgetVerdict:
    """The budget controller's answer for one score.

    Attributes:
        cloud: whether the request goes to the cloud.
        threshold: the score a request had to exceed at this moment.
        state: a JSON snapshot of the shared budget window, for the audit trail.
        reason: one sentence a human can read.
        shadow: the request is also generated on the other tier, to collect a label (shadow sampling).
        reserved_usd: money reserved from the spend limit for this request's cloud image (0 on the edge, or
            without a spend limit).
        shadow_beside: the shadow is a cloud image paid beside ρ (``ROUTET2I_SHADOW_PAID_FROM=allowance``): it
            is money from the spend limit but takes no place in the budget window.
    """

    cloud: bool
    threshold: float | None
    state: Mapping[str, Any]
    reason: str
    shadow: bool = False
    reserved_usd: float = 0.0
    shadow_beside: bool = False

    @property
    def uses_cloud(self) -> bool:
        """Whether the cloud is used at all (as the delivered tier or as the shadow), i.e. spends money."""
        return self.cloud or self.shadow

    @property
    def in_window(self) -> bool:
        """Whether the request takes a cloud place in the budget window: a cloud image delivered, or a shadow
        cloud image paid from ρ."""
        return self.cloud or (self.shadow and not self.shadow_beside)


@dataclass(frozen=True)
class RoutingDecision:
    """One routing decision, as stored in the ``decisions`` table."""

    tier: str
    router_name: str
    router_version: str
    score: float
    threshold: float | None
    budget: float
    budget_state: Mapping[str, Any]
    reason: str
    inputs: Mapping[str, Any]
    predicted: Mapping[str, Any] | None = None
    explanation: Mapping[str, Any] | None = None
    shadow: bool = False
    latency_ms: float = 0.0
