"""Texts to embeddings, fast: the batch path every embedding actor runs (no Ray in here).

Compared with calling ``SentenceTransformer.encode`` per Ray Data batch, this
- tokenizes a whole block in one call of the Rust tokenizer (no per-row Python work),
- sorts the block by token length and cuts batches by a padded-token budget, so short texts go
  many to a batch and a long one does not pad hundreds of short ones,
- runs under bf16 autocast where the hardware does bf16 natively (half weights on GPUs),
and returns the same vectors as ``encode`` (same tokens, same modules, fp32 output).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Precision = str  # "fp32" | "bf16" | "fp16"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run at least as fast as fp32 instead of being emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: str, backend: str = "torch") -> Precision:
    """``auto`` becomes bf16 on CUDA and on CPUs with native bf16, else fp32; on the ONNX
    backend fp32 (int8 changes the vectors measurably, so it is only used when asked for)."""
    if requested != "auto":
        return requested
    if backend == "onnx":
        return "fp32"
    if device.startswith("cuda"):
        return "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


@dataclass(frozen=True)
class EncodeResult:
    embeddings: np.ndarray  # (n, dim) float32, in input order
    truncated: int  # texts longer than max_seq_length (cut to it)


class TextEncoder:
    """Encodes lists of texts with a loaded SentenceTransformer.

    Args:
        model: a loaded ``SentenceTransformer`` (its modules, max_seq_length and Normalize are used).
        device: ``"cpu"`` or ``"cuda[:i]"``.
        precision: ``fp32``, ``bf16`` or ``fp16`` (``fp16`` on GPU only); ``int8`` with onnx.
        backend: ``torch``, or ``onnx`` (CPU; exported once per model, see onnx_backend.py).
        model_dir: the model's local directory, where the ONNX export is cached if writable.
        token_budget: padded tokens per forward pass (rows x longest row).
        max_batch_rows: cap on rows per forward pass.
    """

    def __init__(
        self,
        model,
        *,
        device: str = "cpu",
        precision: Precision = "fp32",
        token_budget: int = 16_384,
        max_batch_rows: int = 512,
        backend: str = "torch",
        model_dir: str | None = None,
    ):
        import torch

        self.model = model.to(device).eval()
        self.device = device
        self.precision = precision
        self.token_budget = token_budget
        self.max_batch_rows = max_batch_rows
        self.tokenizer = model.tokenizer
        self.max_seq_length = int(model.max_seq_length)
        self.dim = int(model.get_embedding_dimension())
        self.normalized = any(type(m).__name__ == "Normalize" for m in model)
        self._needs_token_types = "token_type_ids" in self.tokenizer.model_input_names
        self._pad_id = self.tokenizer.pad_token_id or 0
        self._onnx = None
        if backend == "onnx":
            from sbertray.embed import onnx_backend

            if device != "cpu" or precision not in ("fp32", "int8"):
                raise ValueError(
                    f"backend onnx runs fp32 or int8 on CPU, not {precision} on {device}"
                )
            path = onnx_backend.export(model, model_dir, precision)
            self._onnx = onnx_backend.OnnxForward(
                path, threads=torch.get_num_threads(), normalize=self.normalized
            )
            self._autocast = contextlib.nullcontext
        elif device.startswith("cuda") and precision in ("bf16", "fp16"):
            # On GPUs half weights beat autocast: no per-op casts, half the memory traffic.
            self.model.to(torch.bfloat16 if precision == "bf16" else torch.float16)
            self._autocast = contextlib.nullcontext
        elif precision == "bf16":
            self._autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        elif precision == "fp32":
            self._autocast = contextlib.nullcontext
        else:
            raise ValueError(f"precision `{precision}` is not supported on `{device}`")

    @classmethod
    def for_job(cls, model_path: str, compute, *, device: str, precision: Precision) -> TextEncoder:
        """Loads ``model_path`` and builds the encoder a job's ``compute`` config asks for."""
        from sbertray.modeling import load_model

        return cls(
            load_model(model_path, device=device),
            device=device,
            precision=precision,
            token_budget=compute.token_budget,
            max_batch_rows=compute.max_batch_rows,
            backend=compute.backend,
            model_dir=model_path,
        )

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """Token ids per text, cut to max_seq_length exactly as the tokenizer's own truncation
        would, plus how many texts were longer than that."""
        limit = self.max_seq_length
        # One extra token tells "exactly at the limit" from "cut at the limit".
        ids = self.tokenizer(
            texts,
            truncation=True,
            max_length=limit + 1,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
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
        import torch

        if not texts:
            return EncodeResult(np.zeros((0, self.dim), dtype=np.float32), 0)
        ids, truncated = self.tokenize(texts)
        lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode(), self._autocast():
            for batch in self.plan_batches(lengths):
                width = int(lengths[batch].max())
                input_ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
                for row, index in enumerate(batch):
                    input_ids[row, : lengths[index]] = ids[index]
                mask = (np.arange(width)[None, :] < lengths[batch][:, None]).astype(np.int64)
                if self._onnx is not None:
                    out[batch] = self._onnx(input_ids, mask)
                    continue
                features = {
                    "input_ids": torch.from_numpy(input_ids).to(self.device),
                    "attention_mask": torch.from_numpy(mask).to(self.device),
                }
                if self._needs_token_types:
                    features["token_type_ids"] = torch.zeros_like(features["input_ids"])
                emb = self.model.forward(features)["sentence_embedding"].float()
                if self.normalized:  # re-normalize in fp32 after a reduced-precision pass
                    emb = torch.nn.functional.normalize(emb, dim=-1)
                out[batch] = emb.cpu().numpy()
        return EncodeResult(out, truncated)
