"""ONNX Runtime backend: the transformer exported once per model with ``torch.onnx`` (no
optimum: its pins would downgrade transformers), optionally int8-quantized, run by onnxruntime.

int8 is dynamic quantization of the MatMul weights, per channel. Measured on STS-B dev with
all-MiniLM-L6-v2: per-row cosine to fp32 mean 0.994 / min 0.989, where quantizing every op type
per tensor (onnxruntime's default) gave 0.964 / 0.872. The quality guard test enforces it.

Supported models: a Transformer followed by mean Pooling, optionally Normalize (the
all-MiniLM-L6-v2 family); anything else is refused with a clear error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_OPSET = 17


def check_supported(model) -> None:
    names = [type(m).__name__ for m in model]
    pooling = getattr(model[1], "pooling_mode", None) if len(names) > 1 else None
    if (
        names[:2] != ["Transformer", "Pooling"]
        or pooling != "mean"
        or any(n != "Normalize" for n in names[2:])
    ):
        raise ValueError(
            f"`compute.backend: onnx` supports Transformer + mean Pooling (+ Normalize) models; "
            f"this one is {names} with pooling {pooling!r}. Use `backend: torch`"
        )


def _artifact_dir(model_dir: str) -> Path:
    """``onnx/<model hash>/`` next to the model when its directory is writable and not an
    installed package (a trained model), else in the cache. Keyed by the weights' hash, so a
    model retrained into the same directory never runs a stale export."""
    from sbertray.modeling import cache_root, model_hash

    if not os.path.isdir(model_dir):
        raise ValueError(
            f"`compute.backend: onnx` needs a local model directory, got `{model_dir}`"
        )
    digest = model_hash(model_dir)[:16]
    if os.access(model_dir, os.W_OK) and "site-packages" not in Path(model_dir).parts:
        return Path(model_dir) / "onnx" / digest
    return cache_root() / "onnx" / digest


def export(model, model_dir: str, precision: str) -> Path:
    """Returns the ONNX file for ``model`` at ``precision`` (fp32 | int8), exporting it once.
    Concurrent actors race safely: each writes a temp file and renames it into place."""
    import torch

    check_supported(model)
    out_dir = _artifact_dir(model_dir)
    target = out_dir / f"model_{precision}.onnx"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = out_dir / "model_fp32.onnx"
    if not fp32.exists():
        transformer = model[0].auto_model.eval().float().to("cpu")

        class _Encoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.transformer = transformer

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.transformer(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=token_type_ids,
                ).last_hidden_state

        sample = model.tokenizer(
            ["an example", "another example sentence"], padding=True, return_tensors="pt"
        )
        fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=out_dir)
        os.close(fd)
        torch.onnx.export(
            _Encoder(),
            tuple(sample[k] for k in _INPUTS),
            tmp,
            input_names=list(_INPUTS),
            output_names=["last_hidden_state"],
            dynamic_axes={k: {0: "batch", 1: "tokens"} for k in (*_INPUTS, "last_hidden_state")},
            opset_version=_OPSET,
            dynamo=False,
        )
        os.replace(tmp, fp32)
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=out_dir)
        os.close(fd)
        quantize_dynamic(
            str(fp32),
            tmp,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
        os.replace(tmp, target)
    return target


class OnnxForward:
    """Token ids in, sentence embeddings out (mean pooling over the mask, then Normalize)."""

    def __init__(self, path: Path, *, threads: int, normalize: bool):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.normalize = normalize

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": np.zeros_like(input_ids),
        }
        hidden = self.session.run(None, feeds)[0]
        mask = attention_mask[..., None].astype(np.float32)
        emb = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        if self.normalize:
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb.astype(np.float32)
