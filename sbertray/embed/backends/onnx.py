"""ONNX Runtime on the model's ONNX export (CPU): fp32, or int8 by dynamic per-channel
quantization of the MatMul weights: onnxruntime's default (every op, per tensor) loses far more
of the vectors' quality (docs/benchmarks.md; tests guard the quality).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sbertray.embed import exported
from sbertray.modeling import ModelSpec


class OnnxForward(exported.ExportedForward):
    """``session.run`` is thread-safe: one session serves every thread."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, spec: ModelSpec, *, threads: int, precision: str):
        del precision  # the graph file is fp32 or int8 already (``exported.ensure``)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        super().__init__(spec)

    def hidden_states(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feeds)[0]


BACKEND = exported.backend(
    OnnxForward, name="onnx", precisions={"cpu": ("fp32", "int8")}, priority=20
)
