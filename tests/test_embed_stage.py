"""The embedding stage on its own, without Ray: one unit in, one committed file out, in the
declared output schema."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sbertray.config import ConfigError, EmbedConfig, parse_config
from sbertray.embed.encoder import EncoderSpec
from sbertray.embed.planning import plan_input
from sbertray.embed.stage import EmbedStage, check_output_columns, output_schema


def _config(tmp_path, **input_keys) -> EmbedConfig:
    data = {
        "input": {"path": str(tmp_path / "in"), "passthrough": ["lang"], **input_keys},
        "output": {"path": str(tmp_path / "out")},
    }
    return parse_config(EmbedConfig, data)


def test_a_unit_becomes_one_file_in_the_declared_schema(tmp_path, base_model, bundled_model_path):
    (tmp_path / "in").mkdir()
    texts = ["a cat sat on the mat", None, "stock markets fell today", ""]
    table = pa.table({"id": pa.array([7, 8, 9, 10], pa.int32()), "text": texts, "lang": ["en"] * 4})
    pq.write_table(table, tmp_path / "in" / "part.parquet")
    config = _config(tmp_path, pair_column=None)
    config.bad_input.on_null_text = "skip"
    (unit,) = plan_input(config).units
    spec = EncoderSpec(model=bundled_model_path, backend="torch", precision="fp32")
    stage = EmbedStage(config, spec, {"run_id": "r1", "content_hash": "c1"})

    result = stage.process(unit)

    assert (result.rows_out, result.rows_dropped, result.bad_rows) == (3, 1, {"null text": 1})
    written = pq.read_table(tmp_path / "out" / result.output)
    expected = output_schema(config, 384, {"id": pa.int32(), "lang": pa.string()})
    assert written.schema.remove_metadata() == expected
    assert written.column("id").to_pylist() == [7, 9, 10]
    reference = base_model.encode(["a cat sat on the mat", "stock markets fell today", ""])
    got = np.stack(written.column("embedding").to_numpy(zero_copy_only=False))
    cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert cos.min() >= 0.9999
    meta = json.loads(written.schema.metadata[b"sbertray"])
    assert meta["run_id"] == "r1" and meta["unit"]["rows_dropped"] == 1
    assert not [p for p in (tmp_path / "out").rglob("*") if "_inprogress-" in p.name]


def test_output_schema_follows_the_mode(tmp_path):
    plain = output_schema(_config(tmp_path), 4)
    assert plain.names == ["id", "lang", "embedding", "content_key"]
    assert plain.field("embedding").type == pa.list_(pa.float32(), 4)
    pairs = output_schema(_config(tmp_path, pair_column="other"), 4)
    assert pairs.names == ["id", "lang", "embedding", "embedding_pair", "cosine", "content_key"]
    generated = output_schema(_config(tmp_path, id_column=None), 4)
    assert generated.field("id").type == pa.string()


@pytest.mark.parametrize("column", ["embedding", "id", "cosine"])
def test_passthrough_that_would_overwrite_an_output_column_is_refused(tmp_path, column):
    config = _config(tmp_path, id_column="doc_id", pair_column="other")
    config.input.passthrough = ["lang", column]
    with pytest.raises(ConfigError, match=rf"`input.passthrough` has \['{column}'\]"):
        check_output_columns(config)
    config.input.passthrough = ["lang", "doc_id"]  # the id column itself is written as `id`
    check_output_columns(config)


def test_reference_mode_runs_without_torch(tmp_path, bundled_model_path):
    """What a CPU actor runs in reference (top-k) mode, from the export the driver made: the
    process never imports torch or transformers (5 s of start-up per actor)."""
    import subprocess
    import sys

    from sbertray.embed.prepared import prepare_model

    prepare_model(bundled_model_path, export=True)  # the driver's export step
    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table({"id": [1, 2], "text": ["a cat", "stocks fell"]}), tmp_path / "in" / "a.parquet"
    )
    pq.write_table(
        pa.table({"id": ["pets", "money"], "text": ["animals", "finance"]}),
        tmp_path / "ref.parquet",
    )
    config = {
        "input": {"path": str(tmp_path / "in")},
        "output": {"path": str(tmp_path / "out")},
        "reference": {"path": str(tmp_path / "ref.parquet"), "top_k": 1},
    }
    script = """
import json, sys
from sbertray.config import EmbedConfig, parse_config
from sbertray.embed.encoder import EncoderSpec
from sbertray.embed.planning import plan_input
from sbertray.embed.reference import embed_reference
from sbertray.embed.stage import EmbedStage
config = parse_config(EmbedConfig, json.loads(sys.argv[1]))
spec = EncoderSpec(model=sys.argv[2], backend="openvino", precision="fp32")
stage = EmbedStage(config, spec, {"content_hash": "c1"}, embed_reference(config, spec))
assert stage.process(plan_input(config).units[0]).rows_out == 2
print("torch" in sys.modules, "transformers" in sys.modules)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(config), bundled_model_path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "False"]
    top = pq.read_table(tmp_path / "out" / "a.part-0000.parquet").column("topk_ids").to_pylist()
    assert top == [["pets"], ["money"]]


def test_repeated_texts_are_embedded_once_and_pairs_keyed_in_order(tmp_path, bundled_model_path):
    (tmp_path / "in").mkdir()
    left = ["a cat", "a dog", "a cat", "rain", "a cat", "a dog"]
    right = ["rain", "a cat", "rain", "a cat", "sun", "a cat"]
    pq.write_table(
        pa.table({"id": range(6), "text": left, "other": right, "lang": ["en"] * 6}),
        tmp_path / "in" / "part.parquet",
    )
    config = _config(tmp_path, pair_column="other")
    (unit,) = plan_input(config).units
    spec = EncoderSpec(model=bundled_model_path, backend="openvino", precision="fp32")

    result = EmbedStage(config, spec, {"content_hash": "c1"}).process(unit)

    # Distinct (text, pair) rows: (cat, rain) x2, (dog, cat) x2, (rain, cat), (cat, sun).
    assert (result.rows_out, result.rows_embedded, result.rows_reused) == (6, 4, 0)
    written = pq.read_table(tmp_path / "out" / result.output)
    vectors = np.stack(written.column("embedding").to_numpy(zero_copy_only=False))
    keys = written.column("content_key").to_pylist()
    assert keys[0] == keys[2] and keys[1] == keys[5] and len(set(keys)) == 4
    assert keys[3] != keys[0]  # the same two texts, the other way round
    assert np.array_equal(vectors[0], vectors[2]) and np.array_equal(vectors[0], vectors[4])
    single = EmbedStage(_config(tmp_path / "x"), spec, {"content_hash": "c1"}).encoder
    expected = single.encode(left).embeddings
    assert ((vectors * expected).sum(1) / np.linalg.norm(vectors, axis=1)).min() >= 0.9999
