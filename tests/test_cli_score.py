"""``routet2i score``: errors that name the argument, custom metric sets, and the same numbers in every process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The CLI configures the root logger for its process; give the test process its own back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("score-images")
    rng = np.random.default_rng(5)
    paths = []
    for i, size in enumerate((64, 200)):
        path = directory / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, ["score", *args], env={"ROUTET2I_SCORER__BATCH_SIZE": "4"})


def test_missing_image_is_named(tmp_path: Path) -> None:
    result = invoke(str(tmp_path / "absent.png"))
    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert "Invalid value for 'IMAGE...'" in result.output and "absent.png" in result.output  # type: ignore[attr-defined]


def test_file_that_is_not_an_image_is_named(tmp_path: Path, images: list[Path]) -> None:
    bogus = tmp_path / "notes.png"
    bogus.write_text("not a picture")
    result = invoke(str(images[0]), str(bogus))
    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert "'IMAGE...'" in result.output and "notes.png is not a readable image" in result.output  # type: ignore[attr-defined]


def test_invalid_metric_file_is_named_with_its_field(tmp_path: Path, images: list[Path]) -> None:
    bad = tmp_path / "set.toml"
    bad.write_text('name = "s"\nversion = "1"\n[[metrics]]\nname = "sharpness"\npositive = "Sharp photo"\n')
    result = invoke(str(images[0]), "--metrics", str(bad))
    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert "Invalid value for '--metrics'" in result.output  # type: ignore[attr-defined]
    assert "metrics[0].negative: missing" in result.output  # type: ignore[attr-defined]


def test_missing_metric_file_is_named(tmp_path: Path, images: list[Path]) -> None:
    result = invoke(str(images[0]), "--metrics", str(tmp_path / "absent.json"))
    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert "'--metrics'" in result.output and "cannot read" in result.output  # type: ignore[attr-defined]


@pytest.mark.slow
def test_custom_metric_file_scores_its_metrics(tmp_path: Path, images: list[Path]) -> None:
    custom = tmp_path / "mine.toml"
    custom.write_text(
        'name = "mine"\nversion = "7"\nalignment = false\n'
        '[[metrics]]\nname = "bright"\npositive = "Bright photo"\nnegative = "Dark photo"\n'
    )
    result = invoke(*map(str, images), "--metrics", str(custom), "--json", "--prompt", "a photo")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    records = [json.loads(line) for line in result.stdout.splitlines()]  # type: ignore[attr-defined]
    assert [r["image"] for r in records] == [str(p) for p in images]
    assert all(r["metric_set"] == "mine@7" and list(r["values"]) == ["bright"] for r in records)
    assert "random weights" in result.stderr  # type: ignore[attr-defined]


@pytest.mark.slow
def test_json_output_in_a_separate_process_matches_the_scorer_here(images: list[Path]) -> None:
    """Fixed-seed random weights: a new process builds the same model and prints the same numbers."""
    from worker.scoring import ClipScorer, load_image

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROUTET2I_LOG_LEVEL": "WARNING"}
    env.pop("ROUTET2I_SCORER__PRETRAINED", None)
    completed = subprocess.run(
        [sys.executable, "-m", "cli", "score", *map(str, images), "--prompt", "a striped cat", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    records = [json.loads(line) for line in completed.stdout.splitlines()]
    assert len(records) == 2

    here = ClipScorer(model="ViT-B-32").score([load_image(p) for p in images], ["a striped cat"] * 2)
    for record, vector in zip(records, here, strict=True):
        assert record["metric_set"] == "routet2i@1" and record["model"] == "ViT-B-32"
        assert record["pretrained"] is None
        assert list(record["values"]) == list(vector.metrics)  # ten metrics and alignment
        assert record["values"] == pytest.approx(dict(vector.values), abs=1e-5)
