"""The model exported once to ONNX, run by OpenVINO or ONNX Runtime on CPUs.

Export is ``torch.onnx`` of the transformer (no optimum: its pins would downgrade transformers).
Next to the graph go the tokenizer and a ``spec.json`` (``ModelSpec``) read off the loaded
sentence-transformers model, so an actor whose artifact is cached starts without importing torch, transformers or
sentence-transformers (~5 s per actor here) and tokenizes with the same Rust tokenizer.

Measured per thread on this CPU (AMD EPYC, avx512_bf16), STS-B sentences, token budget 1024:
torch fp32 206 rows/s (MKL takes a 256-bit path on this CPU), ONNX Runtime fp32 420,
OpenVINO fp32 466, torch bf16 autocast 558, OpenVINO bf16 816, ONNX Runtime int8 882.

Precisions: OpenVINO fp32 or bf16 (its inference precision hint; per-row cosine to fp32 mean
0.99999, min 0.99996 on STS-B dev); ONNX Runtime fp32 or int8, dynamic quantization of the MatMul
weights per channel (cosine mean 0.994 / min 0.989, where quantizing every op per tensor,
onnxruntime's default, gave 0.964 / 0.872). Tests guard both.

Supported models: a Transformer followed by mean Pooling, optionally Normalize (the
all-MiniLM-L6-v2 family); ``unsupported_reason`` says why not for anything else.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_OPSET = 17
_FORMAT = 1  # bump when the artifact layout changes: older artifacts are re-exported


@dataclass(frozen=True)
class ModelSpec:
    """What the encoder and the manifest need to know of a model; saved with an export, so
    later runs read it instead of loading the model."""

    dim: int
    max_seq_length: int
    normalized: bool
    do_lower_case: bool  # sentence-transformers lower-cases before tokenizing
    pad_id: int
    format: int = _FORMAT

    @classmethod
    def of(cls, model) -> ModelSpec:
        """Read off a loaded SentenceTransformer."""
        return cls(
            dim=int(model.get_embedding_dimension()),
            max_seq_length=int(model.max_seq_length),
            normalized=any(type(m).__name__ == "Normalize" for m in model),
            do_lower_case=bool(getattr(model[0], "do_lower_case", False)),
            pad_id=int(model.tokenizer.pad_token_id or 0),
        )


def unsupported_reason(model) -> str | None:
    """None when ``model`` can be exported, else why not."""
    names = [type(m).__name__ for m in model]
    pooling = getattr(model[1], "pooling_mode", None) if len(names) > 1 else None
    if (
        names[:2] != ["Transformer", "Pooling"]
        or pooling != "mean"
        or any(n != "Normalize" for n in names[2:])
    ):
        return (
            f"exported backends (onnx, openvino) run Transformer + mean Pooling (+ Normalize) "
            f"models; this one is {names} with pooling {pooling!r}. Use `backend: torch`"
        )
    return None


def artifact_dir(model_dir: str, digest: str | None = None) -> Path:
    """``onnx/<model hash>/`` next to the model when its directory is writable and not an
    installed package (a trained model), else in the cache. Keyed by the weights' hash, so a
    model retrained into the same directory never runs a stale export. ``digest``: the model's
    hash where the caller has it (hashing reads every weight file)."""
    from sbertray.modeling import cache_root, model_hash

    if not os.path.isdir(model_dir):
        raise ValueError(
            f"exported backends (onnx, openvino) need a local model directory, got `{model_dir}`"
        )
    digest = (digest or model_hash(model_dir))[:16]
    if os.access(model_dir, os.W_OK) and "site-packages" not in Path(model_dir).parts:
        return Path(model_dir) / "onnx" / digest
    return cache_root() / "onnx" / digest


def cached_spec(model_dir: str, digest: str | None = None) -> ModelSpec | None:
    """The spec of an existing fp32 export of ``model_dir``, or None."""
    return _read_spec(artifact_dir(model_dir, digest))


def _read_spec(out: Path) -> ModelSpec | None:
    try:
        spec = json.loads((out / "spec.json").read_text())
    except (OSError, ValueError):
        return None
    if spec.get("format") != _FORMAT or not (out / "model_fp32.onnx").exists():
        return None
    return ModelSpec(**spec)


def _write_atomic(target: Path, write) -> None:
    """Concurrent exporters race safely: each writes a temp file and renames it into place."""
    fd, tmp = tempfile.mkstemp(suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export(model, model_dir: str, out: Path | None = None) -> ModelSpec:
    """Exports ``model`` (loaded from ``model_dir``) to ``model_fp32.onnx`` with its tokenizer
    and spec into ``out`` (default ``artifact_dir(model_dir)``), unless already there. Raises
    ValueError for models ``unsupported_reason`` refuses."""
    import torch

    reason = unsupported_reason(model)
    if reason:
        raise ValueError(reason)
    out = out or artifact_dir(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cached := _read_spec(out):
        return cached
    transformer = model[0].auto_model.eval().float().to("cpu")

    class _Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.transformer(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    sample = model.tokenizer(
        ["an example", "another example sentence"], padding=True, return_tensors="pt"
    )
    _write_atomic(
        out / "model_fp32.onnx",
        lambda tmp: torch.onnx.export(
            _Encoder(),
            tuple(sample[k] for k in _INPUTS),
            tmp,
            input_names=list(_INPUTS),
            output_names=["last_hidden_state"],
            dynamic_axes={k: {0: "batch", 1: "tokens"} for k in (*_INPUTS, "last_hidden_state")},
            opset_version=_OPSET,
            dynamo=False,
        ),
    )
    # The exact Rust tokenizer sentence-transformers runs (normalizer, special tokens).
    tokenizer_json = model.tokenizer.backend_tokenizer.to_str()
    _write_atomic(out / "tokenizer.json", lambda tmp: Path(tmp).write_text(tokenizer_json))
    spec = ModelSpec.of(model)
    # spec.json last: its presence says the artifact is complete.
    _write_atomic(out / "spec.json", lambda tmp: Path(tmp).write_text(json.dumps(asdict(spec))))
    return spec


def ensure(model_dir: str, precision: str, model=None) -> tuple[Path, ModelSpec]:
    """The graph file for ``precision`` and the spec, exporting / quantizing once. ``model`` is
    the loaded model if the caller has it; it is loaded only when there is no export yet."""
    out = artifact_dir(model_dir)
    spec = _read_spec(out)
    if spec is None:
        if model is None:
            from sbertray.modeling import load_model

            model = load_model(model_dir, device="cpu")
        spec = export(model, model_dir, out)
    if precision != "int8":  # fp32 and bf16 (a runtime hint) run the fp32 graph
        return out / "model_fp32.onnx", spec
    target = out / "model_int8.onnx"
    if not target.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        _write_atomic(
            target,
            lambda tmp: quantize_dynamic(
                str(out / "model_fp32.onnx"),
                tmp,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                weight_type=QuantType.QInt8,
            ),
        )
    return target, spec


class ExportedTokenizer:
    """The export's tokenizer.json through the ``tokenizers`` library: same ids as the model's
    own fast tokenizer, without importing transformers. Safe to share between threads: its
    truncation is set once here, not per call."""

    def __init__(self, path: Path, spec: ModelSpec):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_padding()
        # One extra token tells "exactly at the limit" from "cut at the limit" (see encoder).
        self._tokenizer.enable_truncation(max_length=spec.max_seq_length + 1)
        self._lower = spec.do_lower_case

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self._lower:
            texts = [t.lower() for t in texts]
        return [e.ids for e in self._tokenizer.encode_batch(texts)]


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray, normalize: bool) -> np.ndarray:
    """sentence-transformers' mean Pooling (+ Normalize) over the transformer's output."""
    mask = attention_mask[..., None].astype(np.float32)
    emb = (hidden.astype(np.float32) * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    if normalize:
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


class OnnxForward:
    """ONNX Runtime: token ids in, sentence embeddings out. ``session.run`` is thread-safe."""

    def __init__(self, path: Path, spec: ModelSpec, *, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.normalize = spec.normalized

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": np.zeros_like(input_ids),
        }
        return mean_pool(self.session.run(None, feeds)[0], attention_mask, self.normalize)


class OpenVinoForward:
    """OpenVINO on the CPU: fp32, or bf16 through its inference precision hint (``auto`` asks
    for bf16 only where the CPU has it natively). One infer request per thread: requests are
    not thread-safe, the compiled model is."""

    def __init__(self, path: Path, spec: ModelSpec, *, threads: int, precision: str):
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(
            core.read_model(str(path)),
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                "INFERENCE_NUM_THREADS": max(1, threads),
                "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY",
                # OpenVINO pins its threads to cores it picks without knowing of other processes:
                # two 1-thread actors both landed on core 0 (2 x 393 rows/s vs 2 x 755 unpinned).
                "ENABLE_CPU_PINNING": False,
            },
        )
        self.normalize = spec.normalized
        self._local = threading.local()

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        feeds = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": np.zeros_like(input_ids),
        }
        hidden = request.infer(feeds)[0]
        return mean_pool(hidden, attention_mask, self.normalize)
