"""The contract every embedding backend fills: where it runs, in which precisions, which models,
and how it turns an ``EncoderSpec`` into a ``TextEncoder``."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sbertray.hardware import cpu_has_native_bf16

if TYPE_CHECKING:
    from sbertray.embed.encoder import EncoderSpec, TextEncoder

DEVICE_WORDS = {"cpu": "CPU", "cuda": "a GPU"}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class Backend:
    """One way of running the model's forward pass.

    Args:
        name: what ``compute.backend`` says to pick it.
        precisions: device ("cpu" | "cuda") -> the precisions it runs there, best first.
        build: (spec, local model dir, loaded model or None) -> encoder; imports its runtime
            only when called, so the registry costs nothing to import.
        runs_export: it runs the ONNX export (``exported.py``), which covers only the models
            ``exported.unsupported_reason`` accepts; other backends run any model.
        priority: ``backend: auto`` picks the highest-priority backend that fits the device,
            precision and model.
        requires: a module that must be importable for it to run (an optional wheel).
        prepare: (spec, local model dir) -> None, run once on the driver before any actor
            starts, for work every actor would otherwise repeat (exporting, quantizing).
    """

    name: str
    precisions: Mapping[str, tuple[str, ...]]
    build: Callable[[EncoderSpec, str, object | None], TextEncoder]
    runs_export: bool = False
    priority: int = 0
    requires: str | None = None
    prepare: Callable[[EncoderSpec, str], None] | None = None

    def available(self) -> bool:
        return self.requires is None or installed(self.requires)

    def runs(self, precision: str, device: str) -> bool:
        return precision in self.precisions.get(device, ())

    def auto_precision(self, device: str) -> str:
        """bf16 on GPUs and on CPUs that do it natively (per-row cosine to fp32 >= 0.9999,
        guarded by tests), else fp32, within what the backend runs on ``device``."""
        native = device.startswith("cuda") or cpu_has_native_bf16()
        wanted = ("bf16", "fp32") if native else ("fp32",)
        offered = self.precisions[device]
        return next((p for p in wanted if p in offered), offered[0])

    def describe(self) -> str:
        return ", ".join(
            f"on {DEVICE_WORDS.get(d, d)} in {' or '.join(ps)}" for d, ps in self.precisions.items()
        )
