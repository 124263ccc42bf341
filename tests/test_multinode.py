"""Multi-node Ray on this machine: a cold cluster, local paths refused, a node lost mid-run
while embedding and while fine-tuning (scenarios in ``multinode.py``, run as their own
process beside the session's Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sbertray import storage

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


@pytest.mark.long
def test_cold_cluster_local_paths_and_a_lost_node(tmp_path, s3_prefix, bundled_model_path):
    # The real model: the node-loss scenario needs a unit running on the removed node when it
    # goes, and with the tiny model the whole run was often done by then.
    model = f"{s3_prefix}/base"
    storage.upload_dir(bundled_model_path, storage.resolve(model))
    # Its own process group: on a timeout the cluster's processes go with the script, not on
    # into the next tests.
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "multinode.py"), str(tmp_path / "work"), model],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    seen = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(seen))  # what each scenario did, for `pytest -s`

    # A cold cluster no node is added to: a clear error after the bounded wait, not a hang.
    assert "no embedding actor could start within 5s" in seen["cold_error"]
    assert "each asks for 1 CPU; the cluster has 0 CPU" in seen["cold_error"]
    assert seen["cold_seconds"] < 60
    # Two nodes: a local output path is refused before anything is written.
    assert "`output.path: " in seen["local_error"] and "storage.shared_paths" in seen["local_error"]
    assert not seen["local_created"]
    # A node removed while its actor runs a unit: the run completes, every id exactly once,
    # nothing left over. The lost unit runs again either on its actor restarted by Ray (a retry
    # within the pass) or in sbertray's next round (`retried_units`), as the timing falls.
    assert seen["unit_in_flight_on_lost_node"] and seen["committed_before_loss"] >= 2
    assert seen["node_loss_error"] is None and seen["success"]
    assert seen["ids"] == [1200, 1200, 0, 1199] and seen["temp_files"] == 0
    assert seen["output_rows"] == 1200
    assert seen["retried_units"] == seen["manifest_units_retried"]
    # The model in object storage: each node downloaded its own copy, with the run's hash.
    for node in seen["node_models"]:
        assert [content for _, content in node] == [seen["model_hash"]]
    # The next night, donors joined on both nodes: only the 60 edited texts are embedded.
    assert seen["rerun"] == [60, 1140, 1200]
    # Fine-tuning loses its worker's node after a checkpoint: it goes on from there elsewhere.
    train = seen["train"]
    assert train["error"] is None and train["checkpoints_before_loss"] >= 1
    assert train["global_step"] == 16 and train["resumed_from_step"] >= 4
    # A GPU node with 2 CPUs: two GPU actors of 1 CPU share its GPU, both placed at once.
    assert seen["gpu_node"] == [2.0, "cuda", 2, 1.0]
    assert seen["gpu_actors_placed"] == [["0"], ["0"]]
