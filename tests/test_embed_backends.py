"""The backend registry (what ``auto`` picks, what a new backend needs) and each backend's
quality guard against plain SentenceTransformer.encode."""

import numpy as np
import pytest
from quality import BF16_WORST_ROW, INT8_MEAN_ROW, assert_keeps_quality

from sbertray.config import ComputeConfig, ConfigError, EmbedConfig, parse_config
from sbertray.embed import backends
from sbertray.embed.backends import base, encoder_for_model
from sbertray.embed.pool import plan_pool
from sbertray.hardware import cpu_has_native_bf16


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _spec(compute, device, exportable):
    return backends.encoder_spec(
        compute, model="m", model_hash="h", device=device, threads=1, exportable=exportable
    )


def test_auto_compute_choice(monkeypatch):
    native = "bf16" if cpu_has_native_bf16() else "fp32"
    cpu = _spec(ComputeConfig(), "cpu", exportable=True)
    assert (cpu.backend, cpu.precision, cpu.token_budget, cpu.max_batch_rows) == (
        "openvino",
        native,
        1024,
        256,
    )
    gpu = _spec(ComputeConfig(), "cuda", exportable=True)
    assert (gpu.backend, gpu.precision, gpu.token_budget) == ("torch", "bf16", 65536)
    other = _spec(ComputeConfig(), "cpu", exportable=False)  # e.g. CLS pooling
    assert (other.backend, other.precision) == ("torch", native)
    int8 = _spec(ComputeConfig(precision="int8"), "cpu", exportable=True)
    assert (int8.backend, int8.precision) == ("onnx", "int8")
    onnx = _spec(ComputeConfig(backend="onnx"), "cpu", exportable=True)
    assert onnx.precision == "fp32"

    monkeypatch.setattr(base, "installed", lambda module: module != "openvino")
    no_openvino = _spec(ComputeConfig(), "cpu", exportable=True)
    assert (no_openvino.backend, no_openvino.precision) == ("onnx", "fp32")
    fixed = _spec(ComputeConfig(token_budget=99, max_batch_rows=7), "cuda", True)
    assert (fixed.token_budget, fixed.max_batch_rows) == (99, 7)
    with pytest.raises(ValueError, match="int8 runs on the ONNX export"):
        _spec(ComputeConfig(precision="int8"), "cpu", exportable=False)
    with pytest.raises(ValueError, match="backend openvino runs the model exported to ONNX"):
        _spec(ComputeConfig(backend="openvino"), "cpu", exportable=False)


def test_openvino_streams_give_the_vectors_of_one(base_model, bundled_model_path, stsb_dev):
    """With 2 threads OpenVINO runs a stream per thread, two batches at once from one Python
    thread: the same vectors, in input order, as one stream on one thread."""
    texts = stsb_dev[0][:400] + ["word " * 300]
    one, two = (
        encoder_for_model(
            base_model, backend="openvino", model_dir=bundled_model_path, threads=threads
        )
        for threads in (1, 2)
    )
    assert two.forward.streams == 2
    with one, two:
        np.testing.assert_allclose(
            two.encode(texts).embeddings, one.encode(texts).embeddings, atol=1e-5
        )


def test_exported_tokenizer_gives_the_models_own_ids(base_model, bundled_model_path, stsb_dev):
    """The exported backends tokenize without transformers: same ids, same truncation."""
    exported = encoder_for_model(
        base_model, backend="openvino", model_dir=bundled_model_path, threads=1
    )
    texts = [*stsb_dev[0], "", "  ", "Ünïcödé — 東京 😀", "word " * 400, "a\tb\nc"]
    got, ref = exported.token_ids(texts), encoder_for_model(base_model).token_ids(texts)
    assert got.rows() == ref.rows() and got.truncated == ref.truncated == 1


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="CPU without native bf16")
def test_openvino_fp32_equals_encode_and_bf16_passes_the_quality_guard(
    base_model, bundled_model_path, stsb_dev
):
    """OpenVINO bf16 is the CPU default here only because it passes this."""
    s1, s2, gold = stsb_dev
    ref_a, ref_b = base_model.encode(s1), base_model.encode(s2)
    ov32 = encoder_for_model(base_model, backend="openvino", model_dir=bundled_model_path)
    assert _cos(ov32.encode(s1[:300]).embeddings, ref_a[:300]).min() >= 0.9999
    bf16 = encoder_for_model(
        base_model, backend="openvino", precision="bf16", model_dir=bundled_model_path
    )
    got = bf16.encode(s1).embeddings, bf16.encode(s2).embeddings
    assert_keeps_quality(got, (ref_a, ref_b), gold, worst_row=BF16_WORST_ROW)


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_concurrent_encodes_give_the_same_vectors(
    base_model, bundled_model_path, stsb_dev, backend
):
    """GPU actors run two units at once (read/tokenize one while the other is on the device):
    the encoder must be safe to share between threads."""
    from concurrent.futures import ThreadPoolExecutor

    enc = encoder_for_model(base_model, backend=backend, model_dir=bundled_model_path)
    blocks = [stsb_dev[0][i * 150 : (i + 1) * 150] for i in range(4)]
    alone = [enc.encode(b).embeddings for b in blocks]
    with ThreadPoolExecutor(4) as pool:
        together = [r.embeddings for r in pool.map(enc.encode, blocks * 2)]
    for i, emb in enumerate(together):
        np.testing.assert_allclose(emb, alone[i % 4], atol=1e-5)


def test_tokenizer_processes_give_the_ids_of_one_process_and_the_models_own(
    base_model, bundled_model_path, stsb_dev, monkeypatch
):
    """GPU actors tokenize a block on all their CPUs: in chunks, in processes, through the Rust
    tokenizer. The ids must be those of this process and of the model's own tokenizer, cut at
    max_seq_length the same way (one text here is far longer than that), in input order; the
    vectors those ids give are the same."""
    from sbertray.embed import encoder
    from sbertray.embed.encoder import MIN_TEXTS_PER_TOKENIZER, TextEncoder

    one = encoder_for_model(base_model, backend="torch", model_dir=bundled_model_path)
    texts = (stsb_dev[0] + stsb_dev[1] + [" ".join(stsb_dev[0][:80])]) * 2
    assert len(texts) > 2 * MIN_TEXTS_PER_TOKENIZER
    with TextEncoder(
        one._tokenize,
        one.forward,
        dim=one.dim,
        max_seq_length=one.max_seq_length,
        tokenize_processes=3,
    ) as pooled:
        tokens, here = pooled.token_ids(texts), one.token_ids(texts)
        np.testing.assert_array_equal(tokens.lengths, here.lengths)
        np.testing.assert_array_equal(tokens.flat, here.flat)
        assert tokens.truncated == here.truncated == 2
        own = base_model.tokenize(texts)["input_ids"]  # padded, cut at max_seq_length
        lengths = own.ne(base_model.tokenizer.pad_token_id).sum(1).tolist()
        assert tokens.rows() == [row[:n] for row, n in zip(own.tolist(), lengths, strict=True)]
        monkeypatch.setattr(encoder, "MIN_TEXTS_PER_TOKENIZER", 64)  # 751 texts: 6 chunks
        few = texts[::8]
        np.testing.assert_allclose(
            pooled.encode(few).embeddings, one.encode(few).embeddings, atol=1e-6
        )


def test_onnx_fp32_equals_encode_and_int8_passes_the_quality_guard(
    base_model, bundled_model_path, stsb_dev
):
    """int8 counts only with its guard: mean per-row cosine to fp32 >= 0.99 on STS-B dev and
    dev Spearman within 0.005 of fp32."""
    s1, s2, gold = stsb_dev
    ref_a, ref_b = base_model.encode(s1), base_model.encode(s2)
    onnx32 = encoder_for_model(
        base_model, precision="fp32", backend="onnx", model_dir=bundled_model_path
    )
    assert _cos(onnx32.encode(s1[:300]).embeddings, ref_a[:300]).min() >= 0.9999
    int8 = encoder_for_model(
        base_model, precision="int8", backend="onnx", model_dir=bundled_model_path
    )
    got = int8.encode(s1).embeddings, int8.encode(s2).embeddings
    assert_keeps_quality(got, (ref_a, ref_b), gold, mean_row=INT8_MEAN_ROW)


def test_a_new_backend_is_one_record(monkeypatch):
    """Registering a backend is all config validation, ``auto``, pool planning and the actors'
    encoder need: here a GPU-only one that outranks torch on GPUs and runs fp8."""
    built = []
    fake = base.Backend(
        name="fastgpu",
        precisions={"cuda": ("fp8", "bf16")},
        build=lambda spec, model_dir, model=None: built.append((spec, model_dir)) or "encoder",
        priority=50,
    )
    monkeypatch.setitem(backends.BACKENDS, "fastgpu", fake)
    embed = {"input": {"path": "in/"}, "output": {"path": "out/"}}

    def checked(compute: dict) -> EmbedConfig:  # as the embed plan checks it
        config = parse_config(EmbedConfig, {**embed, "compute": compute})
        backends.check_config(config.compute)
        return config

    config = checked({"backend": "fastgpu"})
    checked({"precision": "fp8"})
    with pytest.raises(
        ConfigError, match="`compute.backend: fastgpu` runs on a GPU in fp8 or bf16"
    ):
        checked({"backend": "fastgpu", "device": "cpu"})
    with pytest.raises(ConfigError, match="`compute.backend: nope` is not a backend"):
        checked({"backend": "nope"})
    assert plan_pool({"CPU": 8.0, "GPU": 2.0}, config.compute, 10).device == "cuda"
    spec = _spec(ComputeConfig(), "cuda", exportable=False)
    assert (spec.backend, spec.precision) == ("fastgpu", "bf16")
    assert _spec(ComputeConfig(), "cpu", exportable=False).backend == "torch"
    assert backends.build_encoder(spec, "/models/m") == "encoder"
    assert built == [(spec, "/models/m")]
