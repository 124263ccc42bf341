"""OpenVINO on the model's ONNX export (CPU): fp32, or bf16 through its inference precision
hint (tests guard its per-row cosine to fp32). The CPU default where its wheel is installed:
faster than torch on CPU in both precisions (docs/benchmarks.md, machines named).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from sbertray.embed import exported
from sbertray.modeling import ModelSpec


class OpenVinoForward(exported.ExportedForward):
    """On N threads, N streams of one thread each, every stream running a batch of its own,
    rather than one stream splitting each batch over every thread: no thread waits on another
    mid-batch (docs/benchmarks.md gives the measured gain).

    The streams are fed from one Python thread (``run_batches``): N infer requests started
    asynchronously, each waited on in turn. Two Python threads each calling ``infer`` on one
    compiled model deadlocked inside OpenVINO's input copy, once in a Ray actor."""

    runtime = "openvino"

    def __init__(self, path: Path, spec: ModelSpec, *, threads: int, precision: str):
        import openvino as ov

        streams = max(1, threads)
        core = ov.Core()
        self.compiled = core.compile_model(
            core.read_model(str(path)),
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                "INFERENCE_NUM_THREADS": streams,
                "NUM_STREAMS": streams,
                "PERFORMANCE_HINT": "THROUGHPUT" if streams > 1 else "LATENCY",
                # OpenVINO pins its threads to cores it picks without knowing of other processes:
                # two 1-thread actors both landed on core 0 (2 x 393 rows/s vs 2 x 755 unpinned).
                "ENABLE_CPU_PINNING": False,
            },
        )
        self.streams = streams
        self._local = threading.local()
        super().__init__(spec)

    def _requests(self) -> list:
        """This thread's infer requests, one per stream: requests are not thread-safe, the
        compiled model is (an encoder shared by threads, as GPU actors do, stays safe)."""
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = [
                self.compiled.create_infer_request() for _ in range(self.streams)
            ]
        return requests

    def hidden_states(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self._requests()[0].infer(feeds)[0]

    def run_batches(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Embeddings per batch, in order, with a batch running on every stream: while the
        requests run, the next batch is padded and the finished one pooled. Batch i runs on
        request i mod N: the oldest is always the one finished first."""
        requests = self._requests()
        results: list[np.ndarray] = []
        running: deque[np.ndarray] = deque()  # attention masks of the batches started, oldest first

        def finish_oldest() -> None:
            request = requests[len(results) % len(requests)]
            request.wait()
            results.append(self.pool(request.get_output_tensor(0).data, running.popleft()))

        try:
            for input_ids, attention_mask in batches:
                if len(running) == len(requests):
                    finish_oldest()
                # The request copies the inputs (no shared memory): they may be freed now.
                requests[(len(results) + len(running)) % len(requests)].start_async(
                    exported.feeds(input_ids, attention_mask)
                )
                running.append(attention_mask)
            while running:
                finish_oldest()
        finally:
            # A failed block leaves no request running into the next one.
            for request in requests:
                request.wait()
        return results


BACKEND = exported.backend(
    OpenVinoForward, name="openvino", precisions={"cpu": ("fp32", "bf16")}, priority=30
)
