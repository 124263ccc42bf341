"""The model exported once to ONNX, run by OpenVINO or ONNX Runtime on CPUs.

Export is ``torch.onnx`` of the transformer (no optimum: its pins would downgrade transformers).
Next to the graph go the tokenizer and a ``spec.json`` (``ModelSpec``) read off the loaded
sentence-transformers model, so an actor whose artifact is cached starts without importing torch, transformers or
sentence-transformers (seconds per actor) and tokenizes with the same Rust tokenizer.

The runtimes that run the export are backends of their own (``backends/openvino.py``,
``backends/onnx.py``); this module builds and caches what they share: the graph (fp32, and int8
on request), the tokenizer and the spec.

Supported models: a Transformer followed by mean Pooling, then optionally linear ``Dense``
layers (a Matryoshka rotation) and Normalize (the all-MiniLM-L6-v2 family);
``unsupported_reason`` says why not for anything else. A linear layer commutes with the mean
over tokens, so the graph applies it to every token's output and the pooling stays in numpy.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sbertray.embed.encoder import EncoderSpec, RustTokenizer, TextEncoder
from sbertray.hardware import usable_cpus
from sbertray.modeling import (
    SPEC_FORMAT,
    ModelSpec,
    cache_root,
    is_linear_layer,
    load_model,
    model_hash,
    node_lock,
)

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_OPSET = 17


def unsupported_reason(model) -> str | None:
    """None when ``model`` can be exported, else why not."""
    names = [type(m).__name__ for m in model]
    pooling = getattr(model[1], "pooling_mode", None) if len(names) > 1 else None
    layers = list(model)[2:]
    while layers and type(layers[-1]).__name__ == "Normalize":
        layers.pop()
    if (
        names[:2] != ["Transformer", "Pooling"]
        or pooling != "mean"
        or not all(is_linear_layer(layer) for layer in layers)
    ):
        return (
            f"exported backends (onnx, openvino) run Transformer + mean Pooling (+ linear "
            f"Dense) (+ Normalize) models; this one is {names} with pooling {pooling!r}. "
            "Use `backend: torch`"
        )
    return None


def artifact_dir(model_dir: str, digest: str | None = None) -> Path:
    """``onnx/<model hash>/`` next to the model when its directory is writable and not an
    installed package (a trained model), else in the cache. Keyed by the weights' hash, so a
    model retrained into the same directory never runs a stale export. ``digest``: the model's
    hash where the caller has it (hashing reads every weight file)."""
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
    if spec.get("format") != SPEC_FORMAT or not (out / "model_fp32.onnx").exists():
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


def _per_token_graph(model):
    """The module the export traces: the transformer, then the model's linear layers applied
    to each token's output (they commute with the mean pooling done after the graph)."""
    import torch

    class _Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = model[0].auto_model.eval().float().to("cpu")
            dense = [m.float().to("cpu") for m in model if is_linear_layer(m)]
            self.linear_layers = torch.nn.ModuleList(dense)

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.transformer(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            for layer in self.linear_layers:
                hidden = layer.linear(hidden)
            return hidden

    return _Encoder()


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
    sample = model.tokenizer(
        ["an example", "another example sentence"], padding=True, return_tensors="pt"
    )
    with warnings.catch_warnings():
        # The tracer's notes on this graph are expected (shapes stay dynamic through the
        # dynamic_axes; the tests compare the export with the model's own vectors): no need for
        # users to read them on every first run.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        _write_atomic(
            out / "model_fp32.onnx",
            lambda tmp: torch.onnx.export(
                _per_token_graph(model),
                tuple(sample[k] for k in _INPUTS),
                tmp,
                input_names=list(_INPUTS),
                output_names=["last_hidden_state"],
                dynamic_axes={
                    k: {0: "batch", 1: "tokens"} for k in (*_INPUTS, "last_hidden_state")
                },
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


def ensure(
    model_dir: str, precision: str, model=None, digest: str | None = None
) -> tuple[Path, ModelSpec]:
    """The graph file for ``precision`` and the spec, exporting / quantizing once. ``model`` is
    the loaded model if the caller has it; it is loaded only when there is no export yet.
    ``digest``: the model's hash where the caller has it."""
    out = artifact_dir(model_dir, digest)
    spec = _read_spec(out)
    if spec is None:
        # Once per node: the node's other actors wait here, then read the export.
        with node_lock(out.parent / f"{out.name}.lock"):
            spec = _read_spec(out)
            if spec is None:
                if model is None:
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


def prepare(spec: EncoderSpec, model_dir: str) -> None:
    """Builds the graph ``spec`` runs (int8 is quantized here once, not in every actor)."""
    ensure(model_dir, spec.precision, digest=spec.model_hash)


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray, normalize: bool) -> np.ndarray:
    """sentence-transformers' mean Pooling (+ Normalize) over the transformer's output."""
    mask = attention_mask[..., None].astype(np.float32)
    emb = (hidden.astype(np.float32) * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    if normalize:
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


def feeds(input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The export's inputs for one padded batch (single-segment texts: token types all 0)."""
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": np.zeros_like(input_ids),
    }


class ExportedForward:
    """A runtime running the export's graph on one padded batch, then sentence-transformers'
    mean Pooling (+ Normalize) in numpy. Subclasses load the graph and run it."""

    runtime: str  # the module the runtime's wheel installs

    def __init__(self, spec: ModelSpec):
        self.normalize = spec.normalized

    def hidden_states(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def pool(self, hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return mean_pool(hidden, attention_mask, self.normalize)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.pool(self.hidden_states(feeds(input_ids, attention_mask)), attention_mask)


def backend(forward_class: type[ExportedForward], **record):
    """The ``Backend`` record of a runtime that runs the export: ``record`` holds its name,
    precisions and priority; building, preparing and the required wheel follow from
    ``forward_class``."""
    # Imported here: the registry imports the backend modules, which import this one.
    from sbertray.embed.backends.base import Backend

    return Backend(
        build=functools.partial(build_encoder, forward_class=forward_class),
        prepare=prepare,
        runs_export=True,
        requires=forward_class.runtime,
        **record,
    )


def build_encoder(
    spec: EncoderSpec, model_dir: str, model=None, *, forward_class: type[ExportedForward]
) -> TextEncoder:
    """An encoder running ``forward_class(graph, spec, threads=, precision=)`` on the export of
    ``model_dir`` (exported first if there is none)."""
    path, facts = ensure(model_dir, spec.precision, model, spec.model_hash)
    threads = spec.threads or usable_cpus()
    return TextEncoder(
        RustTokenizer.from_file(
            path.with_name("tokenizer.json"), facts.max_seq_length, facts.do_lower_case
        ),
        forward_class(path, facts, threads=threads, precision=spec.precision),
        dim=facts.dim,
        max_seq_length=facts.max_seq_length,
        pad_id=facts.pad_id,
        token_budget=spec.token_budget,
        max_batch_rows=spec.max_batch_rows,
    )
