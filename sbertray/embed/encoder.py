"""Texts to embeddings, fast: the batch path every embedding actor runs (no Ray in here).

Compared with calling ``SentenceTransformer.encode`` per Ray Data batch, this
- tokenizes a whole block in one call of the Rust tokenizer (no per-row Python work),
- sorts the block by token length and cuts batches by a padded-token budget, so short texts go
  many to a batch and a long one does not pad hundreds of short ones,
- runs the fastest backend the hardware does without changing the vectors measurably
  (``resolve_compute``), and returns fp32 vectors in input order.

Backends, all fed the same batches: ``openvino`` and ``onnx`` run the model exported once
(``exported.py``; CPU only, no torch in the actor), ``torch`` runs the sentence-transformers
modules themselves (any architecture, GPUs).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sbertray.config import CPU_ONLY_BACKENDS
from sbertray.embed import exported

# Padded tokens per forward pass and rows per pass when the config leaves them unset.
# On CPU small batches stay in cache: rows/s at budget 1024 vs 16384 was 1.3x (bf16) to 1.4x
# (fp32) here. GPUs want large batches to fill the device.
CPU_TOKEN_BUDGET, CPU_MAX_BATCH_ROWS = 1024, 256
GPU_TOKEN_BUDGET, GPU_MAX_BATCH_ROWS = 65_536, 4096


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run at least as fast as fp32 instead of being emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class ComputeChoice:
    """What an embedding actor runs: the config's ``auto`` values made concrete."""

    backend: str  # torch | onnx | openvino
    precision: str  # fp32 | bf16 | fp16 | int8
    token_budget: int
    max_batch_rows: int


def resolve_compute(compute, device: str, exportable: bool) -> ComputeChoice:
    """Concrete backend, precision and batch sizes for ``compute`` (a ``ComputeConfig``) on
    ``device`` ("cpu" | "cuda"); ``exportable``: the model runs on the exported backends.

    ``auto`` picks the fastest path that keeps the vectors (per-row cosine to fp32 >= 0.9999):
    GPUs: torch, bf16 weights. CPUs: OpenVINO, bf16 where the CPU does bf16 natively, else fp32;
    torch for models the export does not cover. int8 is used only when asked for (ONNX Runtime).
    """
    cuda = device.startswith("cuda")
    backend, precision = compute.backend, compute.precision
    if backend == "auto":
        if precision == "int8" and not exportable:
            raise ValueError(
                "int8 runs on the ONNX export, which covers local Transformer + mean Pooling "
                "models; use fp32 or bf16 for this one"
            )
        if cuda or not exportable:
            backend = "torch"
        elif precision == "int8" or not _installed("openvino"):  # no wheel for the platform
            backend = "onnx"
        else:
            backend = "openvino"
    if precision == "auto":
        if cuda:
            precision = "bf16"
        elif backend == "onnx":
            precision = "fp32"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if backend in CPU_ONLY_BACKENDS and not exportable:
        raise ValueError(
            f"backend {backend} runs the model exported to ONNX, which covers local "
            "Transformer + mean Pooling (+ Normalize) models; use backend torch (or auto)"
        )
    if backend in CPU_ONLY_BACKENDS and (cuda or precision not in CPU_ONLY_BACKENDS[backend]):
        allowed = " or ".join(CPU_ONLY_BACKENDS[backend])
        raise ValueError(f"backend {backend} runs {allowed} on CPU, not {precision} on {device}")
    if backend == "torch" and (precision == "int8" or (precision == "fp16" and not cuda)):
        raise ValueError(
            f"backend torch runs fp32/bf16 (fp16 on GPUs), not {precision} on {device}"
        )
    return ComputeChoice(
        backend=backend,
        precision=precision,
        token_budget=compute.token_budget or (GPU_TOKEN_BUDGET if cuda else CPU_TOKEN_BUDGET),
        max_batch_rows=compute.max_batch_rows
        or (GPU_MAX_BATCH_ROWS if cuda else CPU_MAX_BATCH_ROWS),
    )


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class EncodeResult:
    embeddings: np.ndarray  # (n, dim) float32, in input order
    truncated: int  # texts longer than max_seq_length (cut to it)


class TorchForward:
    """The sentence-transformers modules: any architecture, CPU or GPU.

    On GPUs the weights are cast to bf16/fp16 (no per-op casts, half the memory traffic), inputs
    go through pinned memory without blocking and outputs stay on the device until the block
    ends, so the CPU prepares the next batch while the GPU runs this one.
    """

    def __init__(self, model, device: str, precision: str, *, normalized: bool):
        import torch

        self.torch = torch
        self.model = model.to(device).eval()
        self.device = device
        self.cuda = device.startswith("cuda")
        self.normalized = normalized
        self.needs_token_types = "token_type_ids" in model.tokenizer.model_input_names
        if self.cuda and precision in ("bf16", "fp16"):
            self.model.to(torch.bfloat16 if precision == "bf16" else torch.float16)
            self.autocast = contextlib.nullcontext
        elif precision == "bf16":
            self.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        else:
            self.autocast = contextlib.nullcontext

    def _tensor(self, array: np.ndarray):
        tensor = self.torch.from_numpy(array)
        if self.cuda:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """Embeddings as a float32 tensor on the model's device (no host sync here)."""
        torch = self.torch
        features = {
            "input_ids": self._tensor(input_ids),
            "attention_mask": self._tensor(attention_mask),
        }
        if self.needs_token_types:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        with torch.inference_mode(), self.autocast():
            emb = self.model.forward(features)["sentence_embedding"].float()
            if self.normalized:  # re-normalize in fp32 after a reduced-precision pass
                emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb


class _ModelTokenizer:
    """A loaded model's Hugging Face tokenizer. Its ``__call__`` re-configures truncation on the
    shared Rust tokenizer, which fails under concurrent calls, so each thread gets a copy."""

    def __init__(self, tokenizer, max_length: int, lower_case: bool):
        self._shared, self._max_length, self._lower = tokenizer, max_length, lower_case
        self._local = threading.local()

    def __call__(self, texts: list[str]) -> list[list[int]]:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self._shared)
        if self._lower:
            texts = [t.lower() for t in texts]
        return tokenizer(
            texts,
            truncation=True,
            max_length=self._max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]


class TextEncoder:
    """Encodes lists of texts: tokenize, plan batches, run ``forward``, restore input order.

    Args:
        tokenize: texts -> token ids per text, truncated at ``max_seq_length + 1`` tokens.
        forward: (input_ids, attention_mask) int64 arrays -> (rows, dim) embeddings (numpy, or a
            torch tensor left on its device until the block is done).
        dim, max_seq_length, pad_id: the model's.
        token_budget: padded tokens per forward pass (rows x longest row).
        max_batch_rows: cap on rows per forward pass.

    Build one with ``for_model`` (a loaded model) or ``for_job`` (what a job config asks for).
    """

    def __init__(
        self,
        tokenize: Callable[[list[str]], list[list[int]]],
        forward: Callable,
        *,
        dim: int,
        max_seq_length: int,
        pad_id: int = 0,
        token_budget: int = CPU_TOKEN_BUDGET,
        max_batch_rows: int = CPU_MAX_BATCH_ROWS,
    ):
        self._tokenize = tokenize
        self.forward = forward
        self.dim = dim
        self.max_seq_length = max_seq_length
        self.pad_id = pad_id
        self.token_budget = token_budget
        self.max_batch_rows = max_batch_rows

    @classmethod
    def for_model(
        cls,
        model,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        backend: str = "torch",
        model_dir: str | None = None,
        threads: int | None = None,
        token_budget: int = CPU_TOKEN_BUDGET,
        max_batch_rows: int = CPU_MAX_BATCH_ROWS,
    ) -> TextEncoder:
        """An encoder over a loaded SentenceTransformer; exported backends export it into (or
        next to) ``model_dir`` once."""
        if backend != "torch":
            path, spec = exported.ensure(model_dir, precision, model)
            return cls._exported(
                path, spec, backend, precision, threads, token_budget, max_batch_rows
            )
        spec = exported.ModelSpec.of(model)
        return cls(
            _ModelTokenizer(model.tokenizer, spec.max_seq_length + 1, spec.do_lower_case),
            TorchForward(model, device, precision, normalized=spec.normalized),
            dim=spec.dim,
            max_seq_length=spec.max_seq_length,
            pad_id=spec.pad_id,
            token_budget=token_budget,
            max_batch_rows=max_batch_rows,
        )

    @classmethod
    def for_job(
        cls, model_path: str, choice: ComputeChoice, *, device: str, threads: int
    ) -> TextEncoder:
        """The encoder a job's resolved compute choice asks for. Exported backends with a cached
        export never import torch or sentence-transformers."""
        if choice.backend != "torch":
            path, spec = exported.ensure(model_path, choice.precision)
            return cls._exported(
                path,
                spec,
                choice.backend,
                choice.precision,
                threads,
                choice.token_budget,
                choice.max_batch_rows,
            )
        from sbertray.modeling import load_model

        return cls.for_model(
            load_model(model_path, device=device),
            device=device,
            precision=choice.precision,
            token_budget=choice.token_budget,
            max_batch_rows=choice.max_batch_rows,
        )

    @classmethod
    def _exported(cls, path, spec, backend, precision, threads, token_budget, max_batch_rows):
        if threads is None:
            threads = len(os.sched_getaffinity(0))
        if backend == "onnx":
            forward = exported.OnnxForward(path, spec, threads=threads)
        else:
            forward = exported.OpenVinoForward(path, spec, threads=threads, precision=precision)
        return cls(
            exported.ExportedTokenizer(path.with_name("tokenizer.json"), spec),
            forward,
            dim=spec.dim,
            max_seq_length=spec.max_seq_length,
            pad_id=spec.pad_id,
            token_budget=token_budget,
            max_batch_rows=max_batch_rows,
        )

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """Token ids per text, cut to max_seq_length exactly as the tokenizer's own truncation
        would, plus how many texts were longer than that."""
        limit = self.max_seq_length
        ids = self._tokenize(texts)
        truncated = 0
        for i, row in enumerate(ids):
            if len(row) > limit:
                ids[i] = row[: limit - 1] + row[-1:]  # keep the closing special token
                truncated += 1
        return ids, truncated

    def plan_batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Row indices per forward pass: longest first, each batch within the token budget."""
        order = np.argsort(-lengths, kind="stable")
        batches, start = [], 0
        while start < len(order):
            longest = int(lengths[order[start]])
            rows = max(1, min(self.max_batch_rows, self.token_budget // max(longest, 1)))
            batches.append(order[start : start + rows])
            start += rows
        return batches

    def encode(self, texts: list[str]) -> EncodeResult:
        if not texts:
            return EncodeResult(np.zeros((0, self.dim), dtype=np.float32), 0)
        ids, truncated = self.tokenize(texts)
        lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
        # All ids in one flat array: each batch is then gathered without a per-row Python loop.
        flat = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum())
        )
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        batches = self.plan_batches(lengths)
        parts = []
        for batch in batches:
            width = int(lengths[batch].max())
            columns = np.arange(width)
            mask = columns[None, :] < lengths[batch][:, None]
            positions = np.minimum(starts[batch][:, None] + columns, max(len(flat) - 1, 0))
            input_ids = np.where(mask, flat[positions] if len(flat) else 0, self.pad_id)
            parts.append(self.forward(input_ids, mask.astype(np.int64)))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        out[np.concatenate(batches)] = _stack(parts)
        return EncodeResult(out, truncated)


def _stack(parts: list) -> np.ndarray:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(parts).cpu().numpy()  # one device-to-host copy per block
