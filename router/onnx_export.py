"""The encoder exported to ONNX, and its int8 graph rewritten so that a batch quantizes each prompt on its own.

:class:`router.embeddings.SentenceEncoder` runs its ONNX backends on the graphs written here, in a child process
(``python -m router.onnx_export MODEL_DIR TARGET BACKEND``): :func:`export_onnx` traces the transformers model's
last hidden states (dynamic batch and length), for ``onnx-int8`` quantizes its linear layers' weights to int8
per output channel, and writes beside that graph a second one for batches (:func:`per_prompt_quantization`),
which gives every prompt of a batch the token states it has alone. Kept graphs are named by the encoder's key
and :func:`export_digest`, which changes with this module's code and the libraries that trace, quantize and run
them.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def export_digest() -> str:
    """What an exported graph depends on besides the model files (which :attr:`SentenceEncoder.key` covers):
    this module's code, which writes and rewrites it, and the versions of the libraries that trace, quantize and
    run it. A graph kept under another digest is never loaded."""
    from importlib.metadata import version

    digest = hashlib.sha256(Path(__file__).read_bytes())
    for package in ("torch", "transformers", "onnx", "onnxruntime"):
        digest.update(f"{package}={version(package)}".encode())
    return digest.hexdigest()[:12]


def export_once(model_path: Path, target: Path, backend: str) -> None:
    """Export the encoder at ``model_path`` for ``backend`` to ``target`` unless a complete export is there.

    The export runs in a child process (5–10 s): loading and tracing the torch model would otherwise leave
    several hundred MB in the calling process that ONNX Runtime does not need.
    """
    import subprocess
    import sys

    # The int8 export writes its batch graph before its own file: one without the other is no export.
    if target.is_file() and (backend != "onnx-int8" or batched_graph(target).is_file()):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "router.onnx_export", str(model_path), str(target), backend],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not target.is_file():
        raise RuntimeError(f"exporting the encoder to ONNX failed:\n{done.stderr[-2000:]}")
    log.info("exported the %s encoder to %s", backend, target)


def export_onnx(model_path: Path, target: Path, *, int8: bool) -> None:
    """Export the encoder's last hidden states to ONNX at ``target`` (dynamic batch and length), with int8
    weights per output channel when ``int8``.

    Every file appears whole or not at all (written under a name of its own, then renamed): processes, or hosts
    sharing the directory on a volume, exporting into it at once each leave a complete graph, the last one
    renamed staying (the exports are byte-identical)."""
    import tempfile

    import torch
    from transformers import AutoModel, AutoTokenizer

    # Eager attention exports to plain ONNX ops; torch's SDPA path bakes the traced shapes into the mask.
    model = AutoModel.from_pretrained(model_path, attn_implementation="eager").eval()

    class States(torch.nn.Module):  # the export's signature: ids and mask in, last hidden states out
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    sample = AutoTokenizer.from_pretrained(model_path)(["a photo", "a"], padding=True, return_tensors="pt")
    ids, mask = sample["input_ids"], sample["attention_mask"]  # a padded batch: the mask's path is traced
    axes = {0: "batch", 1: "tokens"}
    with tempfile.TemporaryDirectory(prefix="routet2i-export-") as tmp:
        exported = Path(tmp) / "fp32.onnx"
        with warnings.catch_warnings():  # tracer notes on shape-dependent branches the mask never takes
            warnings.simplefilter("ignore")
            torch.onnx.export(
                States(),
                (ids, mask),
                str(exported),
                input_names=["input_ids", "attention_mask"],
                output_names=["states"],
                dynamic_axes={name: axes for name in ("input_ids", "attention_mask", "states")},
                opset_version=17,
                dynamo=False,
            )
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = exported.with_name("int8.onnx")
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)  # it logs advice on preprocessing at WARNING
            try:
                quantize_dynamic(exported, quantized, weight_type=QuantType.QInt8, per_channel=True)
            finally:
                root.setLevel(level)
            exported = quantized
            import onnx

            batched = batched_graph(target)
            tmp_batched = batched.with_name(f"{batched.name}.{uuid.uuid4().hex}.tmp")
            onnx.save(per_prompt_quantization(onnx.load(str(quantized))), str(tmp_batched))
            tmp_batched.replace(batched)
        tmp_target = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
        tmp_target.write_bytes(exported.read_bytes())
        tmp_target.replace(target)


def batched_graph(model: Path) -> Path:
    """Where the int8 export keeps its graph for batches (:func:`per_prompt_quantization`), beside ``model``."""
    return model.with_name(f"{model.stem}-batched{model.suffix}")


def per_prompt_quantization(model: Any) -> Any:
    """The dynamically quantized encoder rewritten for batches: each prompt quantized with its own range.

    ONNX Runtime's ``DynamicQuantizeLinear`` takes one range (and so one scale and zero point) over its whole
    input, every prompt of a batch and their padding. Here each of them becomes, per prompt: the minimum and
    maximum over that prompt's tokens (the padding's values set to 0, which the range includes anyway), the
    scale ``(max − min) / 255`` and zero point ``round(clip(−min / scale, 0, 255))`` computed as that operator
    computes them, and ``QuantizeLinear`` along the batch axis. ``MatMulInteger`` takes one zero point per input,
    so each product runs without it and subtracts ``zero point × column sums of the weights`` afterwards, in
    int32 and so exactly; the scales that follow are one per prompt by broadcasting. Every prompt's token states
    equal, bit for bit, those of the exported graph run on that prompt alone (all 1,632 PartiPrompts in
    length-sorted batches of 8 on the development machine; tests hold it). (An input that is 0 throughout a
    prompt, for which the operator takes a scale of 1, would give no finite scale here; a layer's input in a
    transformer is never that.)

    Raises:
        ValueError: the graph does not have the shape ``quantize_dynamic`` gives a BERT encoder (an activation's
            quantization feeding anything but ``MatMulInteger`` and the scales' ``Mul``, or weights with a zero
            point other than 0).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    constants = [
        numpy_helper.from_array(np.array([2], dtype=np.int64), "per_prompt/axis_2"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "per_prompt/flat"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "per_prompt/zero"),
        numpy_helper.from_array(np.array(255.0, dtype=np.float32), "per_prompt/levels"),
    ]
    nodes = [  # the tokens' mask, (B, L, 1) float
        helper.make_node("Cast", ["attention_mask"], ["per_prompt/mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["per_prompt/mask", "per_prompt/axis_2"], ["per_prompt/mask_3d"]),
    ]
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    for i, node in enumerate(graph.node):
        if node.op_type == "DynamicQuantizeLinear":
            nodes += _quantize_per_prompt(node, consumers, f"per_prompt/{i}/")
        elif node.op_type == "MatMulInteger":
            replaced, column_sums = _without_zero_point(node, weights)
            nodes += replaced
            constants.append(column_sums)
        else:
            nodes.append(node)
    used = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + constants)
    return model


def _quantize_per_prompt(node: Any, consumers: dict[str, set[str]], p: str) -> list[Any]:
    """The nodes that replace a ``DynamicQuantizeLinear`` ``node``: its input quantized per prompt, with one scale
    and zero point per prompt (shape (B, 1, 1)) under its outputs' names; ``p`` prefixes the new names."""
    from onnx import TensorProto, helper

    x, (quantized, scale, zero_point) = node.input[0], node.output
    if not consumers.get(quantized, set()) <= {"MatMulInteger"} or not consumers.get(scale, set()) <= {"Mul"}:
        raise ValueError(f"unexpected consumers of the quantized activation {x!r}")
    return [
        helper.make_node("Mul", [x, "per_prompt/mask_3d"], [p + "masked"]),
        helper.make_node("ReduceMin", [p + "masked"], [p + "min_tokens"], axes=[1, 2], keepdims=1),
        helper.make_node("ReduceMax", [p + "masked"], [p + "max_tokens"], axes=[1, 2], keepdims=1),
        helper.make_node("Min", [p + "min_tokens", "per_prompt/zero"], [p + "min"]),
        helper.make_node("Max", [p + "max_tokens", "per_prompt/zero"], [p + "max"]),
        helper.make_node("Sub", [p + "max", p + "min"], [p + "range"]),
        helper.make_node("Div", [p + "range", "per_prompt/levels"], [scale]),  # (B, 1, 1)
        helper.make_node("Div", [p + "min", scale], [p + "min_scaled"]),
        helper.make_node("Neg", [p + "min_scaled"], [p + "zero_point_exact"]),
        helper.make_node("Clip", [p + "zero_point_exact", "per_prompt/zero", "per_prompt/levels"], [p + "zc"]),
        helper.make_node("Round", [p + "zc"], [p + "zero_point_float"]),  # half to even, as the operator
        helper.make_node("Cast", [p + "zero_point_float"], [p + "zero_point_u8"], to=TensorProto.UINT8),
        helper.make_node("Cast", [p + "zero_point_float"], [zero_point], to=TensorProto.INT32),
        helper.make_node("Reshape", [scale, "per_prompt/flat"], [p + "scale_b"]),
        helper.make_node("Reshape", [p + "zero_point_u8", "per_prompt/flat"], [p + "zero_point_b"]),
        helper.make_node("QuantizeLinear", [x, p + "scale_b", p + "zero_point_b"], [quantized], axis=0),
    ]


def _without_zero_point(node: Any, weights: dict[str, Any]) -> tuple[list[Any], Any]:
    """The nodes that replace a ``MatMulInteger`` ``node``: the product without the activation's zero point, less
    ``zero point × column sums of the weights`` (in int32, so exactly); and the column sums, a new initializer."""
    from onnx import helper, numpy_helper

    a, w, a_zero, w_zero = node.input
    if w not in weights or w_zero not in weights or numpy_helper.to_array(weights[w_zero]).any():
        raise ValueError(f"expected int8 weights with zero point 0 in {node.name!r}")
    sums = f"per_prompt/column_sums/{w}"
    column_sums = numpy_helper.from_array(numpy_helper.to_array(weights[w]).sum(0, dtype=np.int32), sums)
    raw = f"{node.output[0]}/without_zero_point"
    return [
        helper.make_node("MatMulInteger", [a, w], [raw]),
        helper.make_node("Mul", [a_zero, sums], [raw + "/correction"]),  # (B, 1, N) int32
        helper.make_node("Sub", [raw, raw + "/correction"], [node.output[0]]),
    ], column_sums


if __name__ == "__main__":  # python -m router.onnx_export MODEL_DIR TARGET BACKEND (the export's child process)
    import sys

    export_onnx(Path(sys.argv[1]), Path(sys.argv[2]), int8=sys.argv[3] == "onnx-int8")
