"""Another encoder model than the packaged MiniLM (``ROUTET2I_ENCODER_MODEL``): a BERT built from its
configuration with random weights, with MiniLM's tokenizer, through the encoder backends and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import router.embeddings as embeddings
from cli.main import main
from router.base import RouterError, load_router
from router.embeddings import SentenceEncoder, default_model_path

pytestmark = pytest.mark.slow

POSITIONS = 48


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=POSITIONS,
    )
    BertModel(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(default_model_path() / name, directory / name)
    return directory


def test_another_encoder_model_runs_on_every_backend_under_its_own_key(tiny_bert: Path) -> None:
    prompts = ["a red bicycle leaning on a wall", "two owls", " ".join(["a very long prompt"] * 40)]
    reference = SentenceEncoder(tiny_bert, backend="torch", threads=1)
    onnx = SentenceEncoder(tiny_bert, backend="onnx", threads=1)
    minilm = SentenceEncoder(threads=1)
    assert onnx.key == reference.key and onnx.key.startswith(tiny_bert.name) and onnx.key != minilm.key
    assert onnx.dimension == 32 and onnx.max_tokens == POSITIONS and minilm.max_tokens == embeddings.MAX_TOKENS
    ours, theirs = onnx.encode_tokens(prompts), reference.encode_tokens(prompts)
    for a, b in zip(ours, theirs, strict=True):
        assert a.tokens == b.tokens and a.states.shape[1] == 32
        assert np.abs(a.states - b.states).max() < 1e-4
    assert len(ours[2].tokens) == POSITIONS  # truncated to the model's positions, [SEP] kept last
    assert ours[2].tokens[-1] == "[SEP]"
    int8 = SentenceEncoder(tiny_bert, backend="onnx-int8", threads=1)
    assert int8.key != onnx.key and int8.encode(prompts).shape == (3, 32)


def test_a_router_trained_on_another_encoder_loads_only_on_it(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTET2I_CACHE_DIR", str(tmp_path / "cache"))
    words = ["cat", "dog", "boat", "house", "tree", "bridge", "violin", "car", "lamp", "chair", "clock", "kite"]
    log = tmp_path / "train.jsonl"
    log.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"p{i}",
                    "prompt": f"a {word} " + ("with a sign that says hello" if i % 2 else "on a table"),
                    "quality": {"edge": {"q": 1.0}, "cloud": {"q": 2.0 if i % 2 else 1.0}},
                }
            )
            + "\n"
            for i, word in enumerate(words * 2)
        )
    )
    out = tmp_path / "artifact"
    runner = CliRunner()
    env = {"ROUTET2I_ENCODER_MODEL": str(tiny_bert)}
    trained = runner.invoke(
        main,
        ["train", "--log", str(log), "--out", str(out), "--set", "members=2", "--set", "max_epochs=5", "--json"],
        env=env,
    )
    assert trained.exit_code == 0, trained.output
    manifest = json.loads(trained.stdout)
    assert manifest["encoder"] == SentenceEncoder(tiny_bert).key

    replay = ["replay", "--log", str(log), "--router", "routet2i", "--model", str(out), "--budget", "0.5", "--json"]
    replayed = runner.invoke(main, replay, env=env)
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.stdout)["version"] == manifest["version"]
    # No shipped artifact fits this encoder: a process on it is told to train one rather than given MiniLM's.
    with pytest.raises(RouterError, match="no shipped artifact for this encoder"):
        load_router("routet2i", None, encoder=SentenceEncoder(tiny_bert))

    on_minilm = runner.invoke(main, replay)  # the default encoder: the artifact is refused, naming both
    assert on_minilm.exit_code != 0
    assert "trained on encoder" in on_minilm.output and tiny_bert.name in on_minilm.output


def test_an_encoder_model_that_is_no_model_directory_is_refused_naming_the_setting(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["db", "current"], env={"ROUTET2I_ENCODER_MODEL": str(tmp_path)})
    assert result.exit_code == 1
    assert "encoder_model" in result.output and "config.json" in result.output
