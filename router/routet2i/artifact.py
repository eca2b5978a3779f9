"""The RouteT2I router's artifact: its files, its version hash, loading it back, and the artifacts shipped with
the package.

An artifact is a directory with ``manifest.json`` (settings, metrics, encoder key, training report, version and
the weights' hash) and :data:`WEIGHTS`, every array in float32. The version is a hash of the encoder's key, the
settings and every array, so a decision records exactly what made it.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from router.base import RouterError, read_manifest, write_manifest
from router.embeddings import SentenceEncoder, default_model_path
from router.routet2i.config import RouteT2IConfig

if TYPE_CHECKING:
    from router.routet2i.model import RouteT2IRouter

R = TypeVar("R", bound="RouteT2IRouter")

WEIGHTS = "weights.npz"

LATER_SETTINGS: dict[str, Any] = {"neighbour_share": 0.0, "neighbour_temperature": 0.05, "neighbour_limit": 20_000}
"""Settings added after artifacts were first written, at the values that reproduce an artifact trained before
them: a manifest without one loads with this value, and a setting at this value is left out of the version's
hash, so those artifacts keep their versions and keep loading."""

DEFAULT_ARTIFACT = "default"
"""Name of the artifact shipped in ``router/artifacts/`` (``-int8``: its twin for the int8 encoder);
``routet2i train`` reproduces both (docs/router.md)."""


def arrays(router: RouteT2IRouter) -> dict[str, np.ndarray]:
    """Every fitted array of ``router`` by its name in :data:`WEIGHTS`."""
    found = {f"m{i}.{k}": np.asarray(v) for i, state in enumerate(router.states) for k, v in state.items()}
    found.update(
        mean=router.mean,
        std=router.std,
        scales=router.scales,
        calibration=router.calibration,
        stats_mean=router.stats_mean,
        stats_std=router.stats_std,
        feature_mean=router.feature_mean,
        feature_std=router.feature_std,
    )
    if len(router.neighbour_keys):
        found.update(neighbour_keys=router.neighbour_keys, neighbour_values=router.neighbour_values)
    for i, (coef, intercept) in enumerate(router.priors):
        found[f"prior{i}.coef"], found[f"prior{i}.intercept"] = coef, intercept
    return found


def version_hash(router: RouteT2IRouter) -> str:
    """``name:hash`` of the encoder's key, the settings (less :data:`LATER_SETTINGS` at their old values), the
    metrics and every array."""
    digest = hashlib.sha256(router.encoder.key.encode())
    config = {k: v for k, v in router.config().items() if k not in LATER_SETTINGS or v != LATER_SETTINGS[k]}
    digest.update(json.dumps({"config": config, "metrics": router.metrics}, sort_keys=True).encode())
    found = arrays(router)
    for key in sorted(found):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(found[key], dtype=np.float32).tobytes())
    return f"{router.name}:{digest.hexdigest()[:12]}"


def save(router: RouteT2IRouter, directory: Path) -> Path:
    """Write ``router``'s artifact to ``directory``."""
    if not router.states:
        raise RouterError(f"router {router.name!r} is not fitted; nothing to save")
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / WEIGHTS, **{k: v.astype(np.float32) for k, v in arrays(router).items()})  # type: ignore[arg-type]
    write_manifest(
        directory,
        {
            "router": router.name,
            "version": router.version,
            "config": router.config(),
            "metrics": list(router.metrics),
            "targets": list(router.targets),
            "members": len(router.states),
            "encoder": router.encoder.key,
            "training": router.training_report,
            "sha256": {WEIGHTS: hashlib.sha256((directory / WEIGHTS).read_bytes()).hexdigest()},
        },
    )
    return directory


def load(cls: type[R], directory: Path, *, encoder: SentenceEncoder | None = None) -> R:
    """The router of class ``cls`` in the artifact at ``directory``, on ``encoder`` (None: the router's own).

    Raises:
        RouterError: the artifact was trained on another encoder, its weights do not match their hash, or its
            arrays do not hash to its version.
    """
    manifest = read_manifest(directory)
    router = cls(RouteT2IConfig(**{**LATER_SETTINGS, **manifest.get("config", {})}), encoder=encoder)
    if manifest.get("encoder") != router.encoder.key:
        raise RouterError(
            f"artifact {directory} was trained on encoder {manifest.get('encoder')!r}, "
            f"this process has {router.encoder.key!r}"
        )
    weights = directory / WEIGHTS
    expected = manifest.get("sha256", {}).get(WEIGHTS)
    if not weights.is_file() or hashlib.sha256(weights.read_bytes()).hexdigest() != expected:
        raise RouterError(f"artifact {directory} is corrupt: {WEIGHTS} is missing or does not match its hash")
    with np.load(weights, allow_pickle=False) as data:
        found = {key: data[key].astype(np.float64) for key in data.files}
    install(router, manifest, found)
    if router.version != manifest.get("version"):
        raise RouterError(f"artifact {directory} does not hash to its recorded version {manifest.get('version')}")
    return router


def install(router: RouteT2IRouter, manifest: dict[str, Any], found: dict[str, np.ndarray]) -> None:
    """Set ``router``'s fitted state from an artifact's manifest and arrays (``found`` is emptied)."""
    router.metrics = tuple(manifest["metrics"])
    router.targets = tuple(manifest["targets"])
    router.mean, router.std = found.pop("mean"), found.pop("std")
    router.scales, router.calibration = found.pop("scales"), found.pop("calibration")
    router.stats_mean, router.stats_std = found.pop("stats_mean"), found.pop("stats_std")
    router.feature_mean, router.feature_std = found.pop("feature_mean"), found.pop("feature_std")
    if "neighbour_keys" in found:
        router.neighbour_keys = found.pop("neighbour_keys").astype(np.float32)
        router.neighbour_values = found.pop("neighbour_values").astype(np.float32)
    members = int(manifest["members"])
    priors = [
        (found.pop(f"prior{i}.coef"), found.pop(f"prior{i}.intercept"))
        for i in range(members)
        if f"prior{i}.coef" in found
    ]
    states = [
        {k.split(".", 1)[1]: v.astype(np.float32) for k, v in found.items() if k.startswith(f"m{i}.")}
        for i in range(members)
    ]
    router.set_weights(states, priors)
    router.training_report = manifest.get("training", {})


def shipped(encoder: SentenceEncoder) -> Path | None:
    """The artifact shipped with the package for ``encoder`` (trained on the carried AGIQA-3K ratings):
    ``default`` for the fp32 encoder backends, ``default-int8`` for ``onnx-int8``; None for an encoder model
    other than the packaged MiniLM."""
    if encoder.model_path.resolve() != default_model_path().resolve():
        return None  # none ships for another encoder model
    name = DEFAULT_ARTIFACT + ("-int8" if encoder.backend == "onnx-int8" else "")
    path = Path(str(resources.files("router") / "artifacts" / name))
    return path if (path / "manifest.json").is_file() else None
