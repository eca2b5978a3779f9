"""Learned baselines on the real pretrained MiniLM encoder: embedding cache, learning, artifacts, CV runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.base import load_router
from router.datasets import genai_bench
from router.embeddings import SentenceEncoder
from router.evaluation import evaluate
from router.learned import CloudWinClassifierRouter, GapRegressorRouter, KNNRouter
from router.log import LogRecord
from router.types import QualityVector

pytestmark = pytest.mark.slow

ANIMALS = ["dog", "cat", "horse", "rabbit", "parrot", "tiger", "owl", "fox"]
THINGS = ["teapot", "bicycle", "lamp", "chair", "clock", "guitar", "umbrella", "kettle"]
PLACES = ["on a beach", "in a kitchen", "in the snow", "at night", "in a forest", "on a table"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> SentenceEncoder:
    """The encoder the module's routers share (and its caches)."""
    return SentenceEncoder(cache_dir=tmp_path_factory.mktemp("embeddings"), threads=1)


def topic_log() -> list[LogRecord]:
    """The cloud wins by 2 on prompts about animals and loses by 0.5 on prompts about objects."""
    records = []
    for i, (subject, place) in enumerate((s, p) for s in ANIMALS + THINGS for p in PLACES):
        gain = 2.0 if subject in ANIMALS else -0.5
        records.append(
            LogRecord(
                id=f"t{i}",
                prompt=f"a photo of a {subject} {place}",
                edge=QualityVector({"q": 3.0}),
                cloud=QualityVector({"q": 3.0 + gain}),
            )
        )
    return records


def test_embeddings_are_normalised_and_cached_on_disk(encoder: SentenceEncoder, tmp_path: Path) -> None:
    prompts = ["a red bicycle", "a bowl of soup", "a red bicycle"]
    vectors = encoder.encode(prompts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert (vectors[0] == vectors[2]).all()
    # Related prompts are closer than unrelated ones: the weights are the real pretrained ones.
    bike, car, soup = encoder.encode(["a red bicycle", "a blue bike", "a bowl of soup"])
    assert bike @ car > bike @ soup + 0.2
    # A second encoder on the same cache directory computes nothing.
    fresh = SentenceEncoder(cache_dir=encoder.cache_dir)
    assert (fresh.encode(prompts) == vectors).all()
    assert fresh.computed == 0 and fresh._model is None and not fresh._sessions
    assert encoder.cache_file is not None and encoder.cache_file.is_file()


def test_token_ids_are_the_transformers_tokenizers() -> None:
    from router.data import partiprompts
    from router.datasets import agiqa_3k

    encoder = SentenceEncoder(threads=1)
    odd = ["", "   ", "Crème brûlée 🍮 on a plate", "ÅNGSTRÖM\tnaïve\ncafé", "a" * 3000, " ".join(["two owls"] * 400)]
    prompts = partiprompts() + sorted({r.prompt for r in genai_bench("SDXL_Turbo", "DALLE_3")})
    prompts += sorted({r.prompt for r in agiqa_3k("sd1.5_normal", "xl2.2_normal")}) + odd
    theirs = encoder._load_tokenizer()(prompts, truncation=True, max_length=encoder.max_tokens)["input_ids"]
    ours = encoder._token_ids(prompts)
    assert ours == theirs
    assert max(map(len, ours)) == encoder.max_tokens and ours[-1][-1] == encoder._tokenizer.sep_token_id


def test_onnx_backend_is_the_torch_model_and_int8_is_a_different_one() -> None:
    prompts = ["a red bicycle leaning on a wall", "two owls", "a city at night, oil painting, highly detailed"]
    reference = SentenceEncoder(backend="torch", threads=1)
    onnx = SentenceEncoder(backend="onnx", threads=1)
    assert onnx.key == reference.key  # the same model: artifacts and caches carry over
    for ours, theirs in zip(onnx.encode_tokens(prompts), reference.encode_tokens(prompts), strict=True):
        assert ours.tokens == theirs.tokens
        assert np.abs(ours.states - theirs.states).max() < 1e-4
        assert np.abs(ours.sentence - theirs.sentence).max() < 1e-5
    int8 = SentenceEncoder(backend="onnx-int8", threads=1)
    assert int8.key != reference.key and "int8" in int8.key
    cosine = (int8.encode(prompts) * reference.encode(prompts)).sum(axis=1)
    assert cosine.min() > 0.95 and cosine.max() < 1 - 1e-5  # close to the fp32 model, but not the same one
    with pytest.raises(ValueError, match="backend"):
        SentenceEncoder(backend="tensorrt")


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_batches_run_side_by_side_on_threads_with_the_same_result(backend: str) -> None:
    # The batches themselves are fixed too: they may depend on the prompt set only, never on the thread count or
    # the order the prompts come in.
    prompts = [f"a {colour} {thing} {place}" for colour in ("red", "pale") for thing in THINGS for place in PLACES[:2]]
    one = SentenceEncoder(backend=backend, threads=1, batch_size=5)
    two = SentenceEncoder(backend=backend, threads=2, batch_size=5)
    one.int8_batches = two.int8_batches = True  # int8: as on a CPU with AMX, whatever this one has
    sequential = one.encode_tokens(prompts)
    parallel = two.encode_tokens(prompts[::-1])[::-1]
    assert len(two._pools) == 1 and (1, False) in two._sessions and not one._pools  # the batches ran on a pool
    for a, b in zip(sequential, parallel, strict=True):
        assert a.tokens == b.tokens
        assert np.array_equal(a.states, b.states) and np.array_equal(a.sentence, b.sentence)
    batches = [batch for batch, _, _ in two.hidden_states(prompts)]
    if backend == "onnx":
        assert [len(b) for b in batches] == [5] * 6 + [2]
    else:  # int8: full batches of even lengths, the other prompts one per pass (the same states either way)
        assert {len(b) for b in batches} == {5, 1}
    flat = [p for b in batches for p in b]
    assert sorted(flat) == sorted(prompts) and flat == sorted(prompts, key=lambda p: (len(p), p))


_FORK_AFTER_ENCODING = """
import multiprocessing
import sys

import numpy as np

from router.embeddings import SentenceEncoder


def encode_in_child(encoder, prompts, out):
    encoder.clear()
    out.put(encoder.encode(prompts).tolist())


if __name__ == "__main__":
    prompts = sys.argv[1:]
    encoder = SentenceEncoder(backend="onnx", threads=2)
    parent = encoder.encode(prompts)
    assert encoder._pools, "the batches did not run side by side"
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=encode_in_child, args=(encoder, prompts, out))
    child.start()
    got = np.array(out.get(timeout=120))
    child.join(30)
    assert child.exitcode == 0 and np.array_equal(got, parent), "the child's embeddings differ"
"""


def test_an_encoder_used_before_a_fork_still_runs_its_batches_in_the_child() -> None:
    # Celery's prefork pool forks worker processes; the parent's encoder thread pool has no threads there. The
    # fork happens in a fresh interpreter: one forked from this one would inherit the suite's Celery connections,
    # whose after-fork clean-up can wait forever on a reply the parent already read.
    import subprocess
    import sys

    prompts = [f"a {thing} {place}" for thing in THINGS for place in PLACES[:3]]
    command = [sys.executable, "-c", _FORK_AFTER_ENCODING, *prompts]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


_ENCODE_IN_A_PROCESS = """
import sys
from pathlib import Path

import numpy as np

from router.embeddings import SentenceEncoder

encoder = SentenceEncoder(backend="onnx-int8", threads=1, graph_dir=Path(sys.argv[1]))
prompts = sys.argv[3:]
np.save(sys.argv[2], np.concatenate([t.states for t in encoder.encode_tokens(prompts)]))
"""


def test_exported_graphs_are_kept_for_every_later_process_on_the_machine(tmp_path: Path) -> None:
    import subprocess
    import sys

    from router.onnx_export import batched_graph, export_digest

    prompts = [f"a {thing} {place}" for thing in THINGS for place in PLACES[:2]]
    graphs = tmp_path / "encoders"
    # Two router processes starting at once on an empty directory (a worker's pool children) both export.
    outs = [tmp_path / f"states-{i}.npy" for i in range(2)]
    children = [
        subprocess.Popen([sys.executable, "-c", _ENCODE_IN_A_PROCESS, str(graphs), str(out), *prompts]) for out in outs
    ]
    assert [child.wait(timeout=300) for child in children] == [0, 0]
    first, second = (np.load(out) for out in outs)
    assert np.array_equal(first, second)
    encoder = SentenceEncoder(backend="onnx-int8", threads=1, graph_dir=graphs)
    graph = graphs / f"{encoder.key}-{export_digest()}.onnx"
    assert sorted(graphs.iterdir()) == sorted([graph, batched_graph(graph)])  # no temporary file left
    # A later one loads their files: nothing is exported again (a rename would give new inodes).
    stamps = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in (graph, batched_graph(graph))]
    encoder.int8_batches = True  # both graphs in use, whatever this CPU
    again = encoder.encode_tokens(prompts)
    assert (1, True) in encoder._sessions
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in (graph, batched_graph(graph))] == stamps
    assert np.array_equal(np.concatenate([t.states for t in again]), first)


def test_int8_scores_a_prompt_the_same_alone_as_in_a_batch() -> None:
    # Its activations are quantized with one range per input tensor: in a shared batch a prompt's states would
    # depend on its neighbours. Batches run through a graph that quantizes each prompt with its own range, over
    # its own tokens, so a replay or an evaluation reproduces a live decision exactly.
    from router.data import partiprompts

    prompts = partiprompts()[:200] + [f"a {thing} {place}" for thing in THINGS for place in PLACES]
    alone = SentenceEncoder(backend="onnx-int8", threads=1, batch_size=1)
    batched = SentenceEncoder(backend="onnx-int8", threads=2)
    batched.int8_batches = True  # the default on CPUs with AMX only
    assert batched.batch_size > 1
    one_by_one, in_batches = alone.encode_tokens(prompts), batched.encode_tokens(prompts[::-1])[::-1]
    assert (1, True) in batched._sessions and (1, True) not in alone._sessions  # each used its own graph
    for a, b in zip(one_by_one, in_batches, strict=True):
        assert a.tokens == b.tokens
        assert np.array_equal(a.states, b.states) and np.array_equal(a.sentence, b.sentence)
    # What the quantized graph as exported does with the same batches (one range for the batch): different.
    in_batches = shared = 0
    for batch, inputs, states in batched.hidden_states(prompts):
        if len(batch) == 1:
            continue
        plain = batched._session(1).run(None, inputs)[0]
        for row, prompt in enumerate(batch):
            length = int(inputs["attention_mask"][row].sum())
            assert np.array_equal(states[row, :length], alone.encode_tokens([prompt])[0].states)
            in_batches += 1
            shared += not np.array_equal(plain[row, :length], states[row, :length])
    assert in_batches >= 64 and shared > in_batches // 2
    # Which prompts share a pass is a matter of cost: a full batch of even lengths does; uneven ones (padding
    # above INT8_PADDING of their tokens) run one per pass, as a route worker's few arriving prompts mostly are.
    even = [f"a {thing} on a table" for thing in THINGS]
    uneven = ["cat " * n for n in range(1, 9)]
    assert [len(b) for b, _, _ in batched.hidden_states(even)] == [8]
    assert [len(b) for b, _, _ in batched.hidden_states(uneven)] == [1] * 8
    batched.int8_batches = False  # a CPU without AMX: one prompt per pass
    assert [len(b) for b, _, _ in batched.hidden_states(even)] == [1] * 8


def test_the_batch_graph_refuses_a_graph_it_was_not_written_for() -> None:
    import onnx
    from onnx import TensorProto, helper

    from router.onnx_export import per_prompt_quantization

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 2, 3])
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"]), helper.make_node("Relu", ["s"], ["r"])],
        "odd",
        [x],
        [y],
    )
    with pytest.raises(ValueError, match="unexpected consumers"):
        per_prompt_quantization(onnx.helper.make_model(graph))


@pytest.mark.parametrize("cls", [CloudWinClassifierRouter, GapRegressorRouter, KNNRouter])
def test_learned_routers_learn_a_topic_and_round_trip_as_artifacts(
    cls: type, encoder: SentenceEncoder, tmp_path: Path
) -> None:
    log = topic_log()
    train = [r for i, r in enumerate(log) if i % 6 != 0]
    held_out = [f"a picture of a {s} by the river" for s in ("dog", "cat", "lamp", "chair", "wolf", "hammer")]
    router = cls(encoder).fit(train, seed=0)
    scores = router.score(held_out)
    # Animal prompts (dog, cat, wolf) must rank above object prompts (lamp, chair, hammer), unseen wording.
    assert min(scores[[0, 1, 4]]) > max(scores[[2, 3, 5]]), (router, scores)

    router.save(tmp_path / "artifact")
    loaded = load_router(cls.name, tmp_path / "artifact", encoder=encoder)
    assert (loaded.score(held_out) == scores).all()
    assert loaded.version == router.version != cls.name
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["router"] == cls.name and manifest["encoder"] == encoder.key


def test_hyper_parameters_come_from_the_training_fold_and_the_seed(encoder: SentenceEncoder) -> None:
    log = topic_log()
    a = KNNRouter(encoder).fit(log, seed=1)
    b = KNNRouter(encoder).fit(log, seed=1)
    assert a.version == b.version
    c = GapRegressorRouter(encoder).fit(log[:60], seed=0)
    d = GapRegressorRouter(encoder).fit(log, seed=0)
    assert c.version != d.version


def test_cross_validated_learned_routers_beat_random_on_a_learnable_log(encoder: SentenceEncoder) -> None:
    report = evaluate(
        topic_log(),
        ["random", "cloud-win-classifier", "gap-regressor", "knn", "oracle"],
        folds=4,
        seeds=2,
        encoder=encoder,
    )
    random_apgr = report.routers["random"].mean["apgr"]
    for name in ("cloud-win-classifier", "gap-regressor", "knn"):
        assert report.routers[name].mean["apgr"] > random_apgr + 0.2, name
        assert report.routers[name].mean["apgr"] <= report.routers["oracle"].mean["apgr"] + 1e-9


def test_baselines_on_real_ratings_are_where_earlier_studies_put_them(encoder: SentenceEncoder) -> None:
    """GenAI-Bench SDXL_Turbo -> DALLE_3, 5 folds x 1 seed: the ranking the published comparisons show."""
    report = evaluate(
        genai_bench("SDXL_Turbo", "DALLE_3"),
        ["random", "longest-prompt-first", "gap-regressor", "oracle"],
        encoder=encoder,
    )
    pgr = {name: s.mean["pgr@0.5"] for name, s in report.routers.items()}
    assert 0.35 < pgr["random"] < 0.65
    assert pgr["longest-prompt-first"] > pgr["random"]
    assert pgr["gap-regressor"] > pgr["random"]
    assert pgr["oracle"] > 1.1


@pytest.mark.parametrize("cls", [CloudWinClassifierRouter, GapRegressorRouter, KNNRouter])
def test_a_learned_router_is_calibrated_on_scores_of_prompts_it_did_not_see(
    cls: type, encoder: SentenceEncoder, tmp_path: Path
) -> None:
    from router.budget import BudgetConfig, BudgetController, MemoryBudgetStore
    from router.policy import RoutingPolicy
    from router.splits import split_folds

    log = genai_bench("SDXL_Turbo", "DALLE_3")
    fold = split_folds([r.prompt for r in log], 5, 0)
    router = cls(encoder).fit([r for r, f in zip(log, fold, strict=True) if f != 0], seed=0)
    unseen = [r.prompt for r, f in zip(log, fold, strict=True) if f == 0]
    calibration = router.params["calibration"]
    assert len(calibration) == len(log) - len(unseen) and (np.diff(calibration) >= 0).all()
    # Out-of-fold scores spread as new prompts' scores do: the threshold sends about ρ of the unseen prompts
    # (106 of them: a share's standard error is up to 0.05; over the five folds and both carried pairs the
    # three routers' shares missed ρ by 0.04-0.07 on average, 0.15 at most).
    scores = router.score(unseen)
    for rho in (0.1, 0.3, 0.5):
        threshold = router.calibrated_threshold(rho)
        assert threshold is not None and abs(float((scores > threshold).mean()) - rho) < 0.15, (rho, threshold)
    # A live router's first decisions are taken on it, and an artifact keeps it.
    router.save(tmp_path / "artifact")
    loaded = load_router(cls.name, tmp_path / "artifact", encoder=encoder)
    assert loaded.calibrated_threshold(0.3) == router.calibrated_threshold(0.3)
    policy = RoutingPolicy(loaded, BudgetController(BudgetConfig(rho=0.3, window=500), MemoryBudgetStore(500)))
    first = [policy.decide(p) for p in unseen[:10]]
    assert {d.budget_state["threshold_source"] for d in first} == {"offline calibration"}
    # An artifact from before the calibration was kept still loads, and starts from the window's scores.
    del loaded.params["calibration"]
    assert loaded.calibrated_threshold(0.3) is None
