"""The benchmark registry and ``routet2i bench``; the scoring benchmark run for real at a small size."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from cli.bench import (
    BENCHMARKS,
    Benchmark,
    Measurement,
    get_benchmark,
    interleaved_medians,
    register,
)
from cli.main import main

KEYS = ["name", "value", "unit", "reference", "ratio"]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_measurement_carries_its_reference_and_ratio() -> None:
    m = Measurement.against("x.images_per_s", 30.0, "images/s", 40.0)
    assert m.ratio == 0.75
    assert list(m.to_dict()) == KEYS
    assert Measurement("y", 1.0, "ms").to_dict() == {
        "name": "y",
        "value": 1.0,
        "unit": "ms",
        "reference": None,
        "ratio": None,
    }


def test_registry_knows_scoring_and_refuses_duplicates_and_unknown_names() -> None:
    assert get_benchmark("scoring").target == "cli.bench.scoring:run"
    with pytest.raises(ValueError, match="already registered"):
        register(Benchmark(name="scoring", summary="again", target="x:y"))
    with pytest.raises(KeyError, match=r"available: .*scoring"):
        get_benchmark("nope")


def test_interleaved_medians_alternate_the_functions_within_each_repeat() -> None:
    calls: list[str] = []
    medians = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert set(medians) == {"a", "b"} and all(v >= 0 for v in medians.values())


def test_every_registered_benchmark_is_a_bench_command() -> None:
    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0
    assert all(name in result.output for name in BENCHMARKS)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["scoring", "--batch-sizes", "0,4"], "Invalid value for '--batch-sizes': comma-separated positive integers"),
        (["scoring", "--batch-sizes", "x"], "Invalid value for '--batch-sizes': comma-separated positive integers"),
        (["scoring", "--threads", "-1"], "Invalid value for '--threads'"),
        (["router", "--prompts", "0"], "Invalid value for '--prompts'"),
        (["router", "--prompts", "5000"], "Invalid value for '--prompts': at most 1632"),
        (["router", "--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["router", "--router", "nope"], "Invalid value for '--router': unknown router 'nope'"),
        (["router", "--model", "."], "Invalid value for '--model': . is not a router artifact"),
        (["replay", "--routers", "knn,nope"], "Invalid value for '--routers': unknown router 'nope'"),
        (["replay", "--routers", ","], "Invalid value for '--routers': no router"),
        (["replay", "--folds", "1"], "Invalid value for '--folds'"),
        (["pipeline", "--pool", "forks"], "Invalid value for '--pool'"),
        (["pipeline", "--batch-submissions", "500"], "Invalid value for '--batch-submissions': at most 100"),
        (["api", "--seconds", "0"], "Invalid value for '--seconds'"),
    ],
)
def test_a_bad_parameter_is_a_usage_error_naming_its_option(args: list[str], named: str) -> None:
    # Refused before anything starts: no model is loaded, no stack or server comes up.
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2, result.output
    assert named in result.output


@pytest.mark.slow
def test_scoring_benchmark_prints_measurements_against_the_bare_forward_pass() -> None:
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "scoring",
            "--json",
            "--repeats",
            "1",
            "--batch-sizes",
            "1,2",
            "--image-size",
            "64",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    measurements = json.loads(result.stdout)
    assert [m["name"] for m in measurements] == [
        "scoring.batch1.images_per_s",
        "scoring_no_prompt.batch1.images_per_s",
        "scoring.batch2.images_per_s",
        "scoring_no_prompt.batch2.images_per_s",
    ]
    for m in measurements:
        assert list(m) == KEYS and m["unit"] == "images/s"
        assert m["value"] > 0 and m["reference"] > 0
        assert m["ratio"] == pytest.approx(m["value"] / m["reference"])
    # both measurements of a batch size share the reference timed in the same rounds
    assert measurements[0]["reference"] == measurements[1]["reference"]


def test_router_benchmark_times_decisions_against_the_bare_encoder() -> None:
    result = CliRunner().invoke(
        main,
        ["bench", "router", "--json", "--repeats", "1", "--prompts", "12", "--batch-size", "4", "--threads", "1"],
    )
    assert result.exit_code == 0, result.output
    measurements = {m["name"]: m for m in json.loads(result.stdout)}
    assert list(measurements) == [
        "router.decision.p50_ms",
        "router.decision.p99_ms",
        "router.encoder.onnx.p50_ms",
        "router.batched4.prompts_per_s",
    ]
    for m in measurements.values():
        assert m["value"] > 0 and m["reference"] > 0
        assert m["ratio"] == pytest.approx(m["value"] / m["reference"])
    assert measurements["router.decision.p99_ms"]["value"] >= measurements["router.decision.p50_ms"]["value"]
    # The third row compares the configured backend's forward pass with torch's, the second reference.
    assert measurements["router.encoder.onnx.p50_ms"]["value"] == measurements["router.decision.p50_ms"]["reference"]


def test_cpu_accounting_charges_a_child_process_tree_for_its_work() -> None:
    import subprocess
    import sys

    from cli.bench import cpu

    if not cpu.available():
        pytest.skip("no /proc on this system")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ninput()",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        before = cpu.snapshot()
        assert child.pid in cpu.tree(before, os.getpid())
        deadline = time.monotonic() + 30
        while cpu.snapshot()[child.pid].cpu_s < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = cpu.snapshot()
        busy = cpu.spent(before, after, cpu.tree(after, child.pid))
        assert 0.0 < busy <= 0.3 + 0.2  # what it burned since the first snapshot, and no more
        assert cpu.spent(after, after, cpu.tree(after, child.pid)) == 0.0
        assert os.getpid() in cpu.named(after, lambda name: name.startswith("python") or name.startswith("pytest"))
    finally:
        child.communicate(b"\n", timeout=30)


@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_benchmark_runs_single_and_batched_submissions_through_the_stack(pg_settings, tmp_path) -> None:
    import redis as redis_lib

    from tests.support import PrivateRedis

    (tmp_path / "redis").mkdir()
    broker = PrivateRedis(tmp_path / "redis")
    broker.start()
    env = {
        "ROUTET2I_DATABASE_URL": pg_settings.database_url,
        "ROUTET2I_BROKER_URL": broker.url,
        "ROUTET2I_IMAGE_DIR": str(pg_settings.image_dir),  # the session's image store: the dashboard shows them
        "ROUTET2I_ROUTER": "prompt-complexity",
    }
    try:
        result = CliRunner().invoke(
            main,
            [
                "bench",
                "pipeline",
                "--json",
                "--repeats",
                "1",
                "--latency-jobs",
                "5",
                "--burst-jobs",
                "40",
                "--clients",
                "4",
                "--route-workers",
                "1",
                "--tier-workers",
                "1",
                "--batch-submissions",
                "10",
            ],
            env=env,
        )
        assert result.exit_code == 0, result.output
        measurements = {m["name"]: m for m in json.loads(result.stdout)}
        for name in ("pipeline.latency.p50", "pipeline.throughput", "pipeline.batch10.throughput"):
            assert measurements[name]["value"] > 0 and measurements[name]["reference"] > 0
        # The latency's split: every stage of a job took some time, none more than the slowest whole job, and
        # each is compared with the same bare round trip as the whole.
        total = measurements["pipeline.latency.p50"]
        for stage in ("route_wait", "routing", "tier_wait", "generating"):
            split = measurements[f"pipeline.latency.{stage}.p50"]
            assert 0 < split["value"] <= measurements["pipeline.latency.p99"]["value"], stage
            assert split["reference"] == total["reference"]
        if "pipeline.cpu_per_job.total" in measurements:  # Linux: CPU accounted per part of the stack
            for prefix in ("pipeline", "pipeline.batch10"):
                parts = [
                    m
                    for n, m in measurements.items()
                    if n.startswith(f"{prefix}.cpu_per_job.") and not n.endswith(".total")
                ]
                assert {m["name"].rsplit(".", 1)[1] for m in parts} >= {"api", "route", "edge", "postgres", "redis"}
                assert sum(m["value"] for m in parts) == pytest.approx(
                    measurements[f"{prefix}.cpu_per_job.total"]["value"]
                )
        # Both bursts were drained: no message is left waiting for a worker.
        assert redis_lib.Redis.from_url(broker.url).llen("route") == 0
    finally:
        broker.stop()
