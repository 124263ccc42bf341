"""The embedding backends, one module each, and every rule that picks among them.

Config validation (``check_config``), the pool's device (``may_run_on``), the driver's export
step (``may_run_exported``) and compute resolution (``resolve``, ``encoder_spec``) all read the
``Backend`` records registered here, so a new backend is one module plus one line below:

    from sbertray.embed.backends import tensorrt
    register(tensorrt.BACKEND)
"""

from __future__ import annotations

from sbertray.config import ConfigError
from sbertray.embed.backends import onnx, openvino, torch
from sbertray.embed.backends.base import DEVICE_WORDS, Backend
from sbertray.embed.encoder import EncoderSpec, TextEncoder, batch_defaults

BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


for _module in (torch, onnx, openvino):
    register(_module.BACKEND)


def get(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend `{name}`; registered: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def precisions() -> list[str]:
    """Every precision some backend runs somewhere."""
    return list(
        dict.fromkeys(p for b in BACKENDS.values() for ps in b.precisions.values() for p in ps)
    )


def _candidates(compute) -> list[Backend]:
    return list(BACKENDS.values()) if compute.backend == "auto" else [get(compute.backend)]


def _devices(compute) -> list[str]:
    return list(DEVICE_WORDS) if compute.device == "auto" else [compute.device]


def check_config(compute) -> None:
    """Refuses a ``ComputeConfig`` whose backend or precision is not registered, or that no
    registered backend can run, naming the keys to change."""
    if compute.backend != "auto" and compute.backend not in BACKENDS:
        raise ConfigError(
            f"`compute.backend: {compute.backend}` is not a backend; use auto or one of "
            f"{', '.join(BACKENDS)}"
        )
    if compute.precision not in ("auto", *precisions()):
        raise ConfigError(
            f"`compute.precision: {compute.precision}` is not a precision; use auto or one of "
            f"{', '.join(precisions())}"
        )
    try:
        _check_combination(compute)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_combination(compute) -> None:
    devices = _devices(compute)
    if compute.backend != "auto":
        b = get(compute.backend)
        if compute.device != "auto" and compute.device not in b.precisions:
            raise ValueError(
                f"`compute.backend: {b.name}` runs {b.describe()}, not on {compute.device}"
            )
        if compute.precision != "auto" and not any(b.runs(compute.precision, d) for d in devices):
            runners = [
                x.name
                for x in BACKENDS.values()
                if any(x.runs(compute.precision, d) for d in devices)
            ]
            raise ValueError(
                f"`compute.backend: {b.name}` runs {b.describe()}; `compute.precision: "
                f"{compute.precision}` needs `compute.backend: {' or '.join(runners)}`"
                " (or auto)"
            )
    elif compute.precision != "auto" and not any(
        b.runs(compute.precision, d) for b in BACKENDS.values() for d in devices
    ):
        where = [
            d for d in DEVICE_WORDS if any(b.runs(compute.precision, d) for b in BACKENDS.values())
        ]
        offered = dict.fromkeys(
            p for b in BACKENDS.values() for d in devices for p in b.precisions.get(d, ())
        )
        raise ValueError(
            f"`compute.precision: {compute.precision}` needs "
            f"{' or '.join(DEVICE_WORDS[d] for d in where)}; on {', '.join(devices)} use "
            f"{' or '.join(offered)}"
        )


def may_run_on(compute, device: str) -> bool:
    """Whether some backend the config allows runs on ``device`` in the precision asked."""
    return any(
        device in b.precisions
        and (compute.precision == "auto" or b.runs(compute.precision, device))
        for b in _candidates(compute)
    )


def may_run_exported(compute) -> bool:
    """Whether the actors may run a backend that runs the ONNX export (decided for sure once
    the pool is): then the driver exports the model once, before any actor starts."""
    devices = _devices(compute)
    return any(
        b.runs_export and any(d in b.precisions for d in devices) for b in _candidates(compute)
    )


def resolve(compute, device: str, *, exportable: bool) -> tuple[Backend, str]:
    """The backend and precision for ``compute`` on ``device``; ``exportable``: the model runs
    on the backends that run the ONNX export. ``auto`` picks the highest-priority installed
    backend that runs the model in the precision asked; precision ``auto`` is the backend's
    ``auto_precision``. Raises ValueError for a combination nothing runs."""
    precision = compute.precision
    if compute.backend != "auto":
        backend = get(compute.backend)
        if backend.runs_export and not exportable:
            raise ValueError(
                f"backend {backend.name} runs the model exported to ONNX, which covers local "
                "Transformer + mean Pooling (+ linear Dense, Normalize) models; use backend torch "
                "(or auto)"
            )
    else:
        fitting = [
            b
            for b in BACKENDS.values()
            if b.available()
            and device in b.precisions
            and (exportable or not b.runs_export)
            and (precision == "auto" or b.runs(precision, device))
        ]
        if not fitting:
            runners = [b.name for b in BACKENDS.values() if b.runs(precision, device)]
            if runners and not exportable:
                raise ValueError(
                    f"{precision} runs on the ONNX export ({', '.join(runners)}), which covers "
                    "local Transformer + mean Pooling models; use fp32 or bf16 for this one"
                )
            raise ValueError(f"no installed backend runs {precision} on {device}")
        backend = max(fitting, key=lambda b: b.priority)
    if precision == "auto":
        precision = backend.auto_precision(device)
    if not backend.runs(precision, device):
        raise ValueError(
            f"backend {backend.name} runs {backend.describe()}, not {precision} on {device}"
        )
    return backend, precision


def encoder_spec(
    compute, *, model: str, model_hash: str, device: str, threads: int, exportable: bool
) -> EncoderSpec:
    """The one ``EncoderSpec`` a run ships to all of its actors."""
    backend, precision = resolve(compute, device, exportable=exportable)
    budget, rows = batch_defaults(device)
    return EncoderSpec(
        model=model,
        backend=backend.name,
        precision=precision,
        device=device,
        threads=threads,
        token_budget=compute.token_budget or budget,
        max_batch_rows=compute.max_batch_rows or rows,
        model_hash=model_hash,
    )


def prepare(spec: EncoderSpec, model_dir: str) -> None:
    """The backend's once-per-run work on the driver (e.g. the int8 graph), if it has any."""
    backend = get(spec.backend)
    if backend.prepare is not None:
        backend.prepare(spec, model_dir)


def build_encoder(spec: EncoderSpec, model_dir: str, model=None) -> TextEncoder:
    """The encoder ``spec`` asks for, over the model at ``model_dir`` (``model``: the same model
    already loaded, if the caller has it). Exported backends with a cached export never import
    torch or sentence-transformers."""
    return get(spec.backend).build(spec, model_dir, model)


def encoder_for_model(
    model, *, backend: str = "torch", precision: str = "fp32", model_dir: str | None = None, **spec
) -> TextEncoder:
    """An encoder over a loaded SentenceTransformer (``model_dir``: where it was loaded from,
    for the exported backends). ``spec``: other ``EncoderSpec`` fields."""
    model_dir = model_dir or ""
    return build_encoder(
        EncoderSpec(model=model_dir, backend=backend, precision=precision, **spec), model_dir, model
    )
