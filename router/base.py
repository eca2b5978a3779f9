"""The router interface and its registry.

A router turns prompts into scores: how much the cloud tier is expected to beat the edge tier. The decision
is a threshold on that score, calibrated to the cloud budget (offline by ranking, online by
:mod:`router.budget`). Routers that learn are fitted on a replay log and saved as a versioned artifact.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from router.budget import sorted_quantile
from router.log import LogRecord
from router.types import Prediction, Tier

if TYPE_CHECKING:
    from router.embeddings import SentenceEncoder


class RouterError(Exception):
    """A router was misused: unknown name, not fitted, or an artifact that cannot be loaded."""


class Router(ABC):
    """Base class of every router.

    Subclasses set ``name`` and implement :meth:`score`; learned ones also implement :meth:`fit` and the
    artifact methods.
    """

    name: ClassVar[str]
    learned: ClassVar[bool] = False
    """True when :meth:`fit` learns from the log (such routers are judged only by cross-validation)."""
    needs_labels: ClassVar[bool] = False
    """True for reference routers that read the log's true qualities (the per-prompt oracle): they can only
    score through :meth:`score_records` and can never route live traffic."""
    standalone: ClassVar[bool] = True
    """False for routers built from other routers (a warm-started blend): they are not fitted or evaluated on their
    own, so an evaluation of every router leaves them out."""
    fixed_tier: ClassVar[Tier | None] = None
    """A tier the router always chooses whatever the budget (the all-edge and all-cloud references)."""
    uses_encoder: ClassVar[bool] = False
    """True for routers that embed prompts with a :class:`~router.embeddings.SentenceEncoder`: they take it as the
    ``encoder`` argument of their constructor, :meth:`load` and :meth:`default_artifact` (None: one of their own,
    built at first use), and the registry passes them the one it is given (:func:`create_router`,
    :func:`load_router`), so that every router of a process or an evaluation can share one encoder and its caches."""

    def fit(self, records: Sequence[LogRecord], *, seed: int = 0) -> Router:
        """Learn from a replay log. Routers that learn nothing return themselves unchanged.

        Args:
            records: the training prompts with both tiers' qualities. In cross-validation this is the
                training fold only; a router that needs a validation split (early stopping, hyper-parameter
                search) must carve it out of these records.
            seed: makes every random choice of the fit (splits, initialisation, sampling) reproducible.
        """
        return self

    @abstractmethod
    def score(self, prompts: Sequence[str]) -> np.ndarray:
        """Expected cloud advantage per prompt; larger means send to the cloud first."""

    def score_records(self, records: Sequence[LogRecord]) -> np.ndarray:
        """Scores of a log's prompts, as replay evaluation asks for them.

        Only :attr:`needs_labels` routers may look at anything but ``record.prompt``.
        """
        return self.score([record.prompt for record in records])

    def warm(self, prompts: Sequence[str]) -> None:
        """Precompute per-prompt features (e.g. text embeddings) for prompts it will be fitted on or scored on.

        Evaluation calls it once with every prompt of the log before any split, so work shared across
        folds and seeds is done once, in large batches. It must not depend on labels. Default: nothing.
        """
        return None

    def edge_floor(self) -> float | None:
        """Scores at or below this never go to the cloud whatever the budget (``None``: no such floor).

        A router whose :meth:`predict` sets ``Prediction.max_score_for_edge`` returns the same value here, so
        replay evaluation honours the rule exactly as live routing does.
        """
        return None

    def predict(self, prompts: Sequence[str]) -> list[Prediction]:
        """Scores with whatever else the router knows (predicted qualities, explanations)."""
        return [Prediction(score=float(s)) for s in self.score(prompts)]

    def calibrated_threshold(self, rho: float) -> float | None:
        """The score threshold that sends a share ``rho`` of its calibration prompts to the cloud, if known."""
        return None

    @property
    def version(self) -> str:
        """Identifies the exact behaviour: the name for fixed rules, name plus artifact hash when learned."""
        return self.name

    def save(self, directory: Path) -> Path:
        """Write an artifact a later :meth:`load` restores. Routers without parameters save only config."""
        directory.mkdir(parents=True, exist_ok=True)
        write_manifest(directory, {"router": self.name, "config": self.config()})
        return directory

    @classmethod
    def load(cls, directory: Path, *, encoder: SentenceEncoder | None = None) -> Router:
        """The router saved in ``directory``; ``encoder``: see :attr:`uses_encoder` (the others ignore it)."""
        manifest = read_manifest(directory)
        return cls(**manifest.get("config", {}))

    def config(self) -> dict[str, Any]:
        """Constructor arguments that reproduce this router (before fitting)."""
        return {}

    @classmethod
    def default_artifact(cls, encoder: SentenceEncoder | None = None) -> Path | None:
        """A trained artifact shipped with the package, used when a learned router is named without one; a router
        that :attr:`uses_encoder` ships one per encoder, if any (None: the encoder it would build itself)."""
        return None


class PromptRule(Router):
    """A fixed rule on the prompt's text, learning nothing. Its offline calibration is the carried PartiPrompts
    (:func:`router.data.partiprompts`, 1,632 prompts of many kinds): the threshold that sends a share ``rho`` of
    them to the cloud. Live routing uses it until the budget's window has seen enough scores of its own
    (:data:`router.budget.MIN_SCORES_FOR_QUANTILE`), so a cold start routes about ρ to the cloud, not none."""

    _calibration: np.ndarray | None = None

    def calibrated_threshold(self, rho: float) -> float | None:
        if self._calibration is None:
            from router.data import partiprompts

            self._calibration = np.sort(self.score(partiprompts()))
        return sorted_quantile(self._calibration, 1.0 - rho)


MANIFEST = "manifest.json"


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise RouterError(f"{directory} is not a router artifact (no {MANIFEST})")
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def hash_files(directory: Path, names: Sequence[str]) -> str:
    """Content hash of an artifact's files, stable across machines (sorted names, raw bytes)."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode())
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()


# --- registry -------------------------------------------------------------------------------------------

R = TypeVar("R", bound=type[Router])

_BUILTIN: dict[str, str] = {
    "prompt-complexity": "router.complexity:PromptComplexityRouter",
}
"""Built-in routers by name, as ``module:Class`` so heavy modules (torch) load only when used."""

_REGISTERED: dict[str, type[Router]] = {}


def register(name: str) -> Callable[[R], R]:
    """Class decorator that makes a router available by ``name`` (for plug-ins outside the project)."""

    def wrap(cls: R) -> R:
        cls.name = name
        _REGISTERED[name] = cls
        return cls

    return wrap


def register_builtin(name: str, target: str) -> None:
    """Add a lazily imported router (``module:Class``) to the registry."""
    _BUILTIN[name] = target


def available_routers() -> list[str]:
    return sorted({*_BUILTIN, *_REGISTERED})


def router_class(name: str) -> type[Router]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    target = _BUILTIN.get(name)
    if target is None:
        raise RouterError(f"unknown router {name!r}; available: {', '.join(available_routers())}")
    module_name, _, class_name = target.partition(":")
    cls: type[Router] = getattr(importlib.import_module(module_name), class_name)
    return cls


def create_router(name: str, *, encoder: SentenceEncoder | None = None, **kwargs: Any) -> Router:
    """A new, unfitted router built with ``kwargs``; ``encoder`` goes to a router that :attr:`~Router.uses_encoder`
    (None: it builds its own), the others ignore it."""
    cls = router_class(name)
    if cls.uses_encoder:
        kwargs["encoder"] = encoder
    return cls(**kwargs)


def load_router(name: str, directory: Path | None, *, encoder: SentenceEncoder | None = None) -> Router:
    """A router ready to score: loaded from an artifact when one is given, else freshly built (a learned router:
    from the artifact shipped for ``encoder``). ``encoder`` goes to a router that :attr:`~Router.uses_encoder`
    (None: it builds its own), the others ignore it."""
    if directory is None:
        cls = router_class(name)
        if not cls.learned:
            return cls()
        directory = cls.default_artifact(encoder) if cls.uses_encoder else cls.default_artifact()
        if directory is None:
            raise RouterError(
                f"router {name!r} has no shipped artifact for this encoder: train one (routet2i train) and give "
                "its directory (ROUTET2I_ROUTER_MODEL, or --model)"
            )
    manifest = read_manifest(directory)
    if manifest.get("router") != name:
        raise RouterError(f"artifact {directory} holds router {manifest.get('router')!r}, not {name!r}")
    cls = router_class(name)
    return cls.load(directory, encoder=encoder) if cls.uses_encoder else cls.load(directory)


# Baselines every evaluation shows side by side (docs/evaluation.md describes each).
for _name, _target in {
    "random": "router.baselines:RandomRouter",
    "all-edge": "router.baselines:AllEdgeRouter",
    "all-cloud": "router.baselines:AllCloudRouter",
    "longest-prompt-first": "router.baselines:LongestPromptFirstRouter",
    "noun-count": "router.baselines:NounCountRouter",
    "oracle": "router.baselines:OracleRouter",
    "cloud-win-classifier": "router.learned:CloudWinClassifierRouter",
    "gap-regressor": "router.learned:GapRegressorRouter",
    "knn": "router.learned:KNNRouter",
    "routet2i": "router.routet2i:RouteT2IRouter",
    "routet2i-no-multi-metric": "router.routet2i:NoMultiMetricRouter",
    "routet2i-no-token-selection": "router.routet2i:NoTokenSelectionRouter",
    "routet2i-no-dual-gate": "router.routet2i:NoDualGateRouter",
    "routet2i-no-neighbours": "router.routet2i:NoNeighboursRouter",
    "blend": "router.learning:BlendRouter",
}.items():
    register_builtin(_name, _target)
