"""Texts to embeddings, fast: the batch path every embedding actor runs (no Ray in here).

Compared with calling ``SentenceTransformer.encode`` per Ray Data batch, this
- tokenizes a whole block in one call of the Rust tokenizer (no per-row Python work),
- sorts the block by token length and cuts batches by a padded-token budget, so short texts go
  many to a batch and a long one does not pad hundreds of short ones,
- runs the fastest backend the hardware does without changing the vectors measurably
  (``backends.resolve``), and returns fp32 vectors in input order.

What runs each padded batch is a backend (``backends/``): an ``EncoderSpec`` names it, and
``backends.build_encoder`` turns the spec into a ``TextEncoder``.
"""

from __future__ import annotations

import itertools
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Padded tokens per forward pass and rows per pass when the config leaves them unset.
# On CPU small batches stay in cache (a budget of 1024 measured faster than 16384); GPUs want
# large batches to fill the device.
CPU_TOKEN_BUDGET, CPU_MAX_BATCH_ROWS = 1024, 256
GPU_TOKEN_BUDGET, GPU_MAX_BATCH_ROWS = 65_536, 4096
# Fewest texts per tokenizer process: below it, shipping texts out costs more than it saves.
MIN_TEXTS_PER_TOKENIZER = 2048


class RustTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (the Rust one inside the model's fast tokenizer,
    or an export's tokenizer.json): the same ids as the model's own tokenizer, without
    transformers' per-row Python. Safe to share between threads (truncation is set once here,
    not per call), and it releases the GIL while it encodes, so threads tokenize in parallel."""

    def __init__(self, tokenizer, max_seq_length: int, lower_case: bool):
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        # One extra token tells "exactly at the limit" from "cut at the limit" (see encoder).
        self._tokenizer.enable_truncation(max_length=max_seq_length + 1)
        self._lower = lower_case

    @classmethod
    def from_file(cls, path: Path, max_seq_length: int, lower_case: bool) -> RustTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), max_seq_length, lower_case)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self._lower:
            texts = [t.lower() for t in texts]
        return [e.ids for e in self._tokenizer.encode_batch(texts)]


@dataclass(frozen=True)
class EncoderSpec:
    """What an embedding actor runs, decided once on the driver (``backends.encoder_spec``)
    and shipped to every actor as is."""

    model: str  # what each node resolves on its own: local dir, object-storage URL or hub id
    backend: str  # a name in the ``backends`` registry
    precision: str  # fp32 | bf16 | fp16 | int8, one the backend runs on ``device``
    device: str = "cpu"  # "cpu" | "cuda"
    threads: int | None = None  # intra-op threads, the actor's CPU share; None: every core
    token_budget: int = CPU_TOKEN_BUDGET
    max_batch_rows: int = CPU_MAX_BATCH_ROWS
    model_hash: str | None = None  # the driver's ``model_hash``; None: hashed where needed


def batch_defaults(device: str) -> tuple[int, int]:
    """Token budget and row cap per forward pass when the config leaves them unset."""
    if device.startswith("cuda"):
        return GPU_TOKEN_BUDGET, GPU_MAX_BATCH_ROWS
    return CPU_TOKEN_BUDGET, CPU_MAX_BATCH_ROWS


@dataclass(frozen=True)
class EncodeResult:
    embeddings: np.ndarray  # (n, dim) float32, in input order
    truncated: int  # texts longer than max_seq_length (cut to it)


@dataclass(frozen=True)
class TokenIds:
    """A block's token ids, flat: text i's ids are the next ``lengths[i]`` values of ``flat``."""

    lengths: np.ndarray  # int64, one per text
    flat: np.ndarray  # int64, every text's ids one after another
    truncated: int  # texts longer than max_seq_length (cut to it)

    def rows(self) -> list[list[int]]:
        return [r.tolist() for r in np.split(self.flat, np.cumsum(self.lengths)[:-1])]


def token_ids(
    tokenize: Callable[[list[str]], list[list[int]]], texts: list[str], max_seq_length: int
) -> TokenIds:
    """``tokenize`` over ``texts``, cut to max_seq_length exactly as the tokenizer's own
    truncation would (``tokenize`` stops one token past it, so a cut is counted)."""
    ids = tokenize(texts)
    truncated = 0
    for i, row in enumerate(ids):
        if len(row) > max_seq_length:
            ids[i] = row[: max_seq_length - 1] + row[-1:]  # keep the closing special token
            truncated += 1
    lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return TokenIds(lengths, flat, truncated)


_process_tokenize: Callable[[list[str]], list[list[int]]] | None = None  # in tokenizer processes


def _start_tokenizer_process(tokenize: Callable[[list[str]], list[list[int]]]) -> None:
    global _process_tokenize
    _process_tokenize = tokenize


def _token_ids_in_process(texts: list[str], max_seq_length: int) -> TokenIds:
    return token_ids(_process_tokenize, texts, max_seq_length)


class TextEncoder:
    """Encodes lists of texts: tokenize, plan batches, run ``forward``, restore input order.

    Args:
        tokenize: texts -> token ids per text, truncated at ``max_seq_length + 1`` tokens.
        forward: (input_ids, attention_mask) int64 arrays -> (rows, dim) embeddings (numpy, or a
            torch tensor left on its device until the block is done). One with a
            ``run_batches(iterable of (input_ids, attention_mask)) -> list of embeddings`` runs
            the block's batches through that instead, e.g. several at once.
        dim, max_seq_length, pad_id: the model's.
        token_budget: padded tokens per forward pass (rows x longest row).
        max_batch_rows: cap on rows per forward pass.
        tokenize_processes: processes that tokenize a large block in parallel (``tokenize``
            must pickle): a GPU actor's CPUs, so the tokenizer keeps the GPU fed. Processes,
            not threads: the Rust tokenizer frees the GIL, but turning its output into id
            arrays does not, and on 16 CPUs that part would serialize the threads. Close the
            encoder (``close`` or ``with``) to stop them.

    Build one from an ``EncoderSpec`` with ``backends.build_encoder``.
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
        tokenize_processes: int = 1,
    ):
        self._tokenize = tokenize
        self._tokenizer_processes: ProcessPoolExecutor | None = None
        if tokenize_processes > 1:
            # forkserver: children forked from a clean server process, not from this one with
            # its threads (Ray's, torch's) mid-lock, and without each re-importing everything.
            self._tokenizer_processes = ProcessPoolExecutor(
                tokenize_processes,
                mp_context=multiprocessing.get_context("forkserver"),
                initializer=_start_tokenizer_process,
                initargs=(tokenize,),
            )
            # Started now, while the model loads, not when the first block waits on them.
            for _ in range(tokenize_processes):
                self._tokenizer_processes.submit(int)
        self.tokenize_processes = tokenize_processes
        self.forward = forward
        self.dim = dim
        self.max_seq_length = max_seq_length
        self.pad_id = pad_id
        self.token_budget = token_budget
        self.max_batch_rows = max_batch_rows

    def close(self) -> None:
        """Stops the tokenizer processes (while this process's resource tracker is still up:
        left to the interpreter's exit, they leave warnings about it in the logs)."""
        if self._tokenizer_processes is not None:
            self._tokenizer_processes.shutdown()
            self._tokenizer_processes = None

    def __enter__(self) -> TextEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def token_ids(self, texts: list[str]) -> TokenIds:
        """Token ids of ``texts``; a block large enough to pay for it is split into chunks
        tokenized in the tokenizer processes (twice as many chunks as processes, so shipping
        one overlaps tokenizing another)."""
        chunks = min(2 * self.tokenize_processes, len(texts) // MIN_TEXTS_PER_TOKENIZER)
        if self._tokenizer_processes is None or chunks < 2:
            return token_ids(self._tokenize, texts, self.max_seq_length)
        size = -(-len(texts) // chunks)
        parts = list(
            self._tokenizer_processes.map(
                _token_ids_in_process,
                [texts[i : i + size] for i in range(0, len(texts), size)],
                itertools.repeat(self.max_seq_length),
            )
        )
        return TokenIds(
            np.concatenate([p.lengths for p in parts]),
            np.concatenate([p.flat for p in parts]),
            sum(p.truncated for p in parts),
        )

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
        tokens = self.token_ids(texts)
        # All ids in one flat array: each batch is then gathered without a per-row Python loop.
        lengths, flat = tokens.lengths, tokens.flat
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        batches = self.plan_batches(lengths)

        def padded(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            width = int(lengths[batch].max())
            columns = np.arange(width)
            mask = columns[None, :] < lengths[batch][:, None]
            positions = np.minimum(starts[batch][:, None] + columns, max(len(flat) - 1, 0))
            input_ids = np.where(mask, flat[positions] if len(flat) else 0, self.pad_id)
            return input_ids, mask.astype(np.int64)

        inputs = (padded(b) for b in batches)  # padded one batch ahead of the runtime, no more
        run_batches = getattr(self.forward, "run_batches", None)
        parts = run_batches(inputs) if run_batches else [self.forward(*i) for i in inputs]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        out[np.concatenate(batches)] = _stack(parts)
        return EncodeResult(out, tokens.truncated)


def _stack(parts: list) -> np.ndarray:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(parts).cpu().numpy()  # one device-to-host copy per block
