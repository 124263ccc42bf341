"""Compact embeddings: ``output.truncate_dim`` keeps the first N dimensions (Matryoshka-style),
``output.embedding_dtype`` stores float16, int8 or packed binary instead of float32.

| dtype   | Parquet column                      | bytes per row (384 dims) | search with            |
|---------|-------------------------------------|--------------------------|------------------------|
| float32 | fixed_size_list<float>[d]           | 1,536                    | cosine / dot           |
| float16 | fixed_size_list<halffloat>[d]       | 768                      | cosine / dot           |
| int8    | fixed_size_list<int8>[d]            | 384                      | dot of the int8 values |
| binary  | fixed_size_list<uint8>[ceil(d / 8)] | 48                       | Hamming distance       |

The arithmetic is sentence-transformers' ``quantize_embeddings`` (int8: per-dimension ranges
mapped to -128..127; binary: sign bits packed 8 to a byte, "ubinary"), written out in numpy
(``quantize_int8``) so that actors do not import sentence-transformers. int8 ranges are
calibrated once per model and output and reused, so vectors of different nights compare.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from sbertray import storage
from sbertray.config import ConfigError, EmbedConfig, EmbedOutputConfig
from sbertray.embed import backends
from sbertray.embed.prepared import PreparedModel
from sbertray.embed.shards import EmbedInputError, InputPlan
from sbertray.embed.texts import sample_texts

VALUE_TYPES = {
    "float32": pa.float32(),
    "float16": pa.float16(),
    "int8": pa.int8(),
    "binary": pa.uint8(),
}
# Rows embedded to calibrate int8 ranges: enough for stable per-dimension extremes.
CALIBRATION_ROWS = 2048


def width(output: EmbedOutputConfig, dim: int) -> int:
    """Values per stored vector."""
    kept = output.truncate_dim or dim
    return math.ceil(kept / 8) if output.embedding_dtype == "binary" else kept


def vector_type(output: EmbedOutputConfig, dim: int) -> pa.DataType:
    return pa.list_(VALUE_TYPES[output.embedding_dtype], width(output, dim))


def check(output: EmbedOutputConfig, dim: int) -> None:
    if output.truncate_dim and output.truncate_dim > dim:
        raise ConfigError(
            f"`output.truncate_dim: {output.truncate_dim}` is larger than the model's "
            f"dimension {dim}; use at most {dim}"
        )


def compact(embeddings: np.ndarray, output: EmbedOutputConfig, ranges) -> np.ndarray:
    """Full float32 vectors to what is stored."""
    kept = embeddings[:, : output.truncate_dim] if output.truncate_dim else embeddings
    if output.embedding_dtype == "float32":
        return kept
    if output.embedding_dtype == "float16":
        return kept.astype(np.float16)
    if output.embedding_dtype == "int8":
        return quantize_int8(kept, ranges)
    return np.packbits(kept > 0, axis=-1)  # sentence-transformers' "ubinary"


def quantize_int8(embeddings: np.ndarray, ranges) -> np.ndarray:
    """sentence-transformers' ``quantize_embeddings(precision="int8", ranges=...)``, in numpy:
    its import (4.5 s of CPU here) was most of a small int8 or binary run's actor start-up.
    ``test_embed_compact`` holds the two equal."""
    ranges = np.asarray(ranges, dtype=np.float32)
    starts = ranges[0]
    steps = (ranges[1] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    buckets = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
    return (buckets - 128).astype(np.int8)


def calibrate(sample: np.ndarray, output: EmbedOutputConfig) -> list[list[float]]:
    """int8 ranges from sample embeddings: [[min per dim], [max per dim]]."""
    kept = sample[:, : output.truncate_dim] if output.truncate_dim else sample
    return [kept.min(0).tolist(), kept.max(0).tolist()]


def given_ranges(output: EmbedOutputConfig, storage_config, dim: int) -> list[list[float]]:
    """The ranges file named by ``output.int8_ranges``, checked against the stored width."""
    loc = storage.resolve(output.int8_ranges, storage_config)
    try:
        ranges = json.loads(storage.read_bytes(loc))
    except ValueError as exc:
        raise ConfigError(f"`output.int8_ranges` {output.int8_ranges}: not JSON: {exc}") from None
    wanted = output.truncate_dim or dim
    if len(ranges) != 2 or any(len(row) != wanted for row in ranges):
        raise ConfigError(
            f"`output.int8_ranges` {output.int8_ranges}: want [[{wanted} minimums], "
            f"[{wanted} maximums]]"
        )
    return ranges


def resolve_int8_ranges(
    config: EmbedConfig, last_manifest: dict | None, model: PreparedModel, inputs: InputPlan
) -> list[list[float]]:
    """The given ranges, else those an earlier run into this output (``last_manifest``)
    calibrated for the same model and width (so vectors of different nights compare), else
    calibrated now on a sample of the input, on this machine's CPU."""
    output = config.output
    if output.int8_ranges:
        return given_ranges(output, config.storage, model.spec.dim)
    previous = last_manifest or {}
    if previous.get("model", {}).get("model_hash") == model.model_hash:
        earlier = previous.get("compact") or {}
        if earlier.get("int8_ranges") and earlier.get("truncate_dim") == output.truncate_dim:
            return earlier["int8_ranges"]
    texts = sample_texts(config, inputs.units, CALIBRATION_ROWS)
    if not texts:
        raise EmbedInputError("int8 calibration: the input has no texts to calibrate on")
    cpu = config.compute.model_copy(
        update={"device": "cpu", "backend": "auto", "precision": "fp32"}
    )
    spec = backends.encoder_spec(
        cpu,
        model=model.path,
        model_hash=model.model_hash,
        device="cpu",
        threads=None,
        exportable=model.exportable,
    )
    sample = backends.build_encoder(spec, model.path).encode(texts).embeddings
    return calibrate(sample, output)
