"""OpenVINO on the model's ONNX export (CPU): fp32, or bf16 through its inference precision
hint (per-row cosine to fp32 mean 0.99999, min 0.99996 on STS-B dev; tests guard it). The CPU
default where its wheel is installed.

Measured per thread here (AMD EPYC, avx512_bf16, STS-B sentences): fp32 466 rows/s, bf16 816;
torch fp32 206 (MKL takes a 256-bit path on this CPU), torch bf16 autocast 558.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from sbertray.embed import exported
from sbertray.modeling import ModelSpec


class OpenVinoForward(exported.ExportedForward):
    """One infer request per thread: requests are not thread-safe, the compiled model is."""

    runtime = "openvino"

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
        self._local = threading.local()
        super().__init__(spec)

    def hidden_states(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request.infer(feeds)[0]


BACKEND = exported.backend(
    OpenVinoForward, name="openvino", precisions={"cpu": ("fp32", "bf16")}, priority=30
)
