"""The sentence-transformers modules themselves on torch: any architecture, CPU or GPU.

On GPUs the weights are cast to bf16/fp16 (no per-op casts, half the memory traffic), inputs go
through pinned memory without blocking and outputs stay on the device until the block ends, so
the CPU prepares the next batch while the GPU runs this one.
"""

from __future__ import annotations

import contextlib
import copy
import threading

import numpy as np

from sbertray.embed.backends.base import Backend
from sbertray.embed.encoder import EncoderSpec, RustTokenizer, TextEncoder


class TorchForward:
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
    """A loaded model's slow (Python) Hugging Face tokenizer, where it has no Rust one. Its
    ``__call__`` re-configures truncation, so each thread gets a copy."""

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


def build(spec: EncoderSpec, model_dir: str, model=None) -> TextEncoder:
    import torch

    from sbertray.modeling import ModelSpec, load_model

    if spec.threads:
        torch.set_num_threads(spec.threads)
    if model is None:
        model = load_model(model_dir, device=spec.device)
    facts = ModelSpec.of(model)
    if getattr(model.tokenizer, "is_fast", False):
        from tokenizers import Tokenizer

        # A copy: truncation is set on it, and the model's own tokenizer stays as it was.
        rust = Tokenizer.from_str(model.tokenizer.backend_tokenizer.to_str())
        tokenize = RustTokenizer(rust, facts.max_seq_length, facts.do_lower_case)
    else:
        tokenize = _ModelTokenizer(model.tokenizer, facts.max_seq_length + 1, facts.do_lower_case)
    return TextEncoder(
        tokenize,
        TorchForward(model, spec.device, spec.precision, normalized=facts.normalized),
        dim=facts.dim,
        max_seq_length=facts.max_seq_length,
        pad_id=facts.pad_id,
        token_budget=spec.token_budget,
        max_batch_rows=spec.max_batch_rows,
        # A GPU actor's CPUs tokenize (the GPU waits on them); a CPU actor's run the model.
        tokenize_processes=(spec.threads or 1) if spec.device.startswith("cuda") else 1,
    )


BACKEND = Backend(
    name="torch",
    precisions={"cpu": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16")},
    build=build,
    priority=10,
)
