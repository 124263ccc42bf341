"""Compact embeddings: float16, int8 and packed binary vectors, truncated dimensions; the
arithmetic is sentence-transformers' quantize_embeddings; int8 ranges persist across runs."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from sbertray.config import ConfigError, EmbedConfig, EmbedOutputConfig, parse_config
from sbertray.embed import compact
from sbertray.embed.encoder import EncoderSpec
from sbertray.embed.planning import plan_input
from sbertray.embed.run import run_embed
from sbertray.embed.stage import EmbedStage

TEXTS = ["a cat sat on the mat", "stock markets fell today", "the weather is mild", "hello"]


def _config(tmp_path, out: str, **output) -> EmbedConfig:
    return parse_config(
        EmbedConfig,
        {
            "input": {"path": str(tmp_path / "in")},
            "output": {"path": str(tmp_path / out), **output},
            "compute": {"precision": "fp32"},
        },
    )


def _embed_unit(tmp_path, bundled_model_path, out: str, ranges=None, **output) -> pa.Table:
    config = _config(tmp_path, out, **output)
    (unit,) = plan_input(config).units
    spec = EncoderSpec(model=bundled_model_path, backend="openvino", precision="fp32")
    metadata = {"content_hash": "c1"} | ({"int8_ranges": ranges} if ranges is not None else {})
    result = EmbedStage(config, spec, metadata).process(unit)
    return pq.read_table(tmp_path / out / result.output)


@pytest.fixture
def texts_in(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "text": TEXTS}), tmp_path / "in" / "a.parquet")
    return tmp_path


def test_each_dtype_stores_what_quantize_embeddings_gives(texts_in, bundled_model_path):
    tmp = texts_in
    full = _embed_unit(tmp, bundled_model_path, "f32")
    vectors = np.stack(full.column("embedding").to_numpy(zero_copy_only=False))
    ranges = [vectors.min(0).tolist(), vectors.max(0).tolist()]
    expected = {
        "float16": (pa.float16(), 384, vectors.astype(np.float16)),
        "int8": (pa.int8(), 384, quantize_embeddings(vectors, "int8", ranges=np.array(ranges))),
        "binary": (pa.uint8(), 48, quantize_embeddings(vectors, "ubinary")),
    }
    for dtype, (value_type, width, want) in expected.items():
        table = _embed_unit(tmp, bundled_model_path, dtype, ranges, embedding_dtype=dtype)
        assert table.schema.field("embedding").type == pa.list_(value_type, width), dtype
        got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(got, want)
        # Readable as one column of lists by DuckDB (and so by pandas/polars through Arrow).
        rows = duckdb.sql(
            f"select len(embedding) from read_parquet('{tmp / dtype}/*.parquet')"
        ).fetchall()
        assert rows == [(width,)] * 4, dtype

    short = _embed_unit(tmp, bundled_model_path, "t128", truncate_dim=128)
    got = np.stack(short.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(got, vectors[:, :128])


def test_int8_and_binary_equal_sentence_transformers_outside_the_ranges_too():
    """sbertray's numpy quantization against the library's: values beyond the calibrated
    ranges (clipped), a dimension whose range is one value, and signs for binary."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 64)).astype(np.float32)
    vectors[:, 3] = 0.25
    ranges = np.stack([vectors[:50].min(0), vectors[:50].max(0)])  # the rest falls outside
    np.testing.assert_array_equal(
        compact.quantize_int8(vectors, ranges.tolist()),
        quantize_embeddings(vectors, "int8", ranges=ranges),
    )
    output = EmbedOutputConfig(path="unused", embedding_dtype="binary")
    np.testing.assert_array_equal(
        compact.compact(vectors, output, None), quantize_embeddings(vectors, "ubinary")
    )


def test_a_truncate_dim_beyond_the_model_is_refused_before_any_work(texts_in):
    with pytest.raises(
        ConfigError, match=r"`output.truncate_dim: 512` is larger than the model's dimension 384"
    ):
        run_embed(_config(texts_in, "out", truncate_dim=512))
    assert not (texts_in / "out").exists()


@pytest.mark.slow
def test_int8_ranges_are_calibrated_once_and_reused(ray_2cpu, texts_in):
    tmp = texts_in
    config = _config(tmp, "out", embedding_dtype="int8", truncate_dim=64)
    run_embed(config)
    first = json.loads((tmp / "out" / "_manifest.json").read_text())["compact"]
    assert first["embedding_dtype"] == "int8" and len(first["int8_ranges"][0]) == 64
    meta = json.loads(pq.read_schema(tmp / "out" / "a.part-0000.parquet").metadata[b"sbertray"])
    assert meta["int8_ranges"] == first["int8_ranges"]

    # The next night brings a new file: the ranges stay, so old and new vectors compare.
    pq.write_table(
        pa.table({"id": [5], "text": ["an entirely different topic"]}), tmp / "in" / "b.parquet"
    )
    second = run_embed(config)  # b joins a's unit: a's rows are copied, b's embedded
    assert (second.texts_embedded, second.embedded_rows) == (1, second.output_rows)
    assert json.loads((tmp / "out" / "_manifest.json").read_text())["compact"] == first
