"""End-to-end fine-tuning through Ray Train on a 2-CPU local Ray: real model, real data."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from processes import kill_when, run, sbertray_cmd
from stsb import every_nth_pair

from sbertray.config import PairDataConfig, TrainConfig, load_config
from sbertray.hardware import cpu_has_native_bf16
from sbertray.ray_runtime import ray_train_settings
from sbertray.report import summarize
from sbertray.train import checkpoints, evaluate_model, train
from sbertray.train.data import load_pairs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _stsb_eighth_recipe(stsb_dir: Path, tmp_path: Path, *overrides: str) -> TrainConfig:
    """The STS-B recipe for 1 epoch on every 8th training pair (719: STS-B train is ordered by
    genre, captions first, and every 8th row covers all of them), scored at the end only, on
    every 3rd dev pair (500, every genre)."""
    return load_config(
        TrainConfig,
        REPO / "jobs/configs/stsb.yaml",
        [
            "training.epochs=1",
            f"train.path={every_nth_pair(stsb_dir, 'train', 8, tmp_path)}",
            f"dev.path={every_nth_pair(stsb_dir, 'dev', 3, tmp_path)}",
            "training.eval_every=end",
            "training.select_best=false",
            f"output.model={tmp_path / 'model'}",
            *overrides,
        ],
    )


@pytest.mark.long
def test_two_workers_raise_stsb_dev_spearman_above_base(ray_2cpu, base_model, stsb_dir, tmp_path):
    """CI's short STS-B run: 1 epoch on 719 pairs across 2 workers must beat the base model on
    500 dev pairs of every genre."""
    from sentence_transformers import SentenceTransformer

    config = _stsb_eighth_recipe(
        stsb_dir, tmp_path, "scaling.num_workers=2", "training.logging_steps=10"
    )
    dev = load_pairs(config.dev)
    base = evaluate_model(base_model, dev, name="stsb-dev")
    result = train(config)

    # Global batch 16 split as 8 per worker: the step count is the single-worker one. Under
    # DDP sentence-transformers drops the incomplete last batch (uneven batches hang DDP).
    assert result.global_step == 719 // 16
    assert result.num_workers == 2 and result.train_rows == 719
    tuned = result.dev_metrics["spearman_cosine"]
    assert tuned > base.spearman_cosine + 0.005, (tuned, base.spearman_cosine)

    model = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    reloaded = evaluate_model(model, dev, name="stsb-dev")
    assert reloaded.spearman_cosine == pytest.approx(tuned, abs=1e-4)
    assert model.max_seq_length == 256
    assert type(model[-1]).__name__ == "Normalize"

    card = (tmp_path / "model" / "README.md").read_text()
    for section in (
        "### Full Model Architecture",
        "#### stsb",
        "* Samples:",
        "#### Non-Default Hyperparameters",
        "| **spearman_cosine** |",
        "### Training Logs",
        "### Framework Versions",
        "base_model: sentence-transformers/all-MiniLM-L6-v2",
    ):
        assert section in card, section
    assert "`per_device_train_batch_size`: 8" in card  # 16 global / 2 workers
    saved = json.loads((tmp_path / "model" / "train_result.json").read_text())
    assert [e["step"] for e in saved["loss_log"]] == [1, *range(10, 719 // 16, 10)]
    # The report's dev curve starts from the base model's score.
    start = saved["eval_log"][0]
    assert start["step"] == 0
    assert start["stsb-dev_spearman_cosine"] == pytest.approx(base.spearman_cosine, abs=1e-3)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="CPU without native bf16")
def test_bf16_training_on_a_native_bf16_cpu(ray_2cpu, base_model, stsb_dir, tmp_path):
    """`training.precision: bf16` on a CPU with AVX512-BF16/AMX: autocast steps through Ray
    Train raise dev Spearman like fp32 steps do, and the saved weights stay fp32."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    config = _stsb_eighth_recipe(stsb_dir, tmp_path, "training.precision=bf16")
    base = evaluate_model(base_model, load_pairs(config.dev), name="stsb-dev")
    result = train(config)
    assert result.global_step == 719 // 16
    assert result.dev_metrics["spearman_cosine"] > base.spearman_cosine + 0.005
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}
    assert "`bf16`: True" in (tmp_path / "model" / "README.md").read_text()
    # Eager attention was for training only: the saved model loads with the default again.
    reloaded = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert reloaded[0].auto_model.config._attn_implementation == "sdpa"


def _complete_checkpoints(root: Path) -> list[int]:
    """Steps of the checkpoints rank 0 marked complete (fully uploaded)."""
    return sorted(
        int(p.parent.name.split("-")[1]) for p in root.glob("*/checkpoint-*/" + checkpoints.MARKER)
    )


def _saving_past(complete: list[int], scratch: Path) -> bool:
    """Whether a checkpoint is complete and the trainer has begun saving a newer one in
    scratch (the Hugging Face trainer's ``checkpoint-<step>`` folders)."""
    saving = [int(p.name.split("-")[1]) for p in scratch.glob("*/hf/checkpoint-*")]
    return bool(complete) and max(saving, default=0) > max(complete)


@pytest.mark.long
def test_resume_after_killing_the_run(
    ray_2cpu, tmp_path, monkeypatch, tiny_model_path, s3_server, s3_prefix
):
    """Kill the whole training process tree once a checkpoint is complete and the next one is
    being written (in scratch, maybe half uploaded and unmarked). The rerun continues from the
    newest complete checkpoint and runs only the remaining steps; a completed run leaves no
    scratch behind. The same run never interrupted, from and to object storage, gives the same
    model."""
    scratch, ckpt = tmp_path / "scratch", tmp_path / "ckpt"
    monkeypatch.setenv("SBERTRAY_SCRATCH", str(scratch))  # the runs' env: see processes.py
    recipe = REPO / "jobs/configs/concepts.yaml"
    settings = [
        f"base_model={tiny_model_path}",
        "training.epochs=8",
        "training.checkpoint_steps=8",
        "training.keep_checkpoints=2",
        "training.logging_steps=2",
    ]
    cmd = sbertray_cmd(
        "train",
        str(recipe),
        *settings,
        f"output.model={tmp_path / 'model'}",
        f"output.checkpoints={ckpt}",
    )
    kill_when(
        cmd,
        lambda: _saving_past(_complete_checkpoints(ckpt), scratch),
        what="a complete checkpoint and the next one's save",
    )
    complete = _complete_checkpoints(ckpt)
    assert 0 < max(complete) < 32
    assert not (tmp_path / "model" / "train_result.json").exists()

    second = run(cmd)
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads((tmp_path / "model" / "train_result.json").read_text())
    assert result["global_step"] == 32  # 40 pairs / batch 10 = 4 steps x 8 epochs
    assert result["resumed_from_step"] == max(complete)
    assert f"resumed from step {max(complete)}" in second.stdout
    # sbertray's own local Ray: no preemption watcher, no State API warning every second.
    for noise in ("PreemptionWatcher", "Failed to query Ray Train Controller"):
        assert noise not in second.stdout + second.stderr
    ran = [int(step) for step in re.findall(r"\[sbertray\] step (\d+)/", second.stdout)]
    assert sorted(set(ran)) == list(range(max(complete) + 2, 33, 2))
    assert "training 40 pairs: 32 steps of global batch 10" in second.stdout
    logged = [e["step"] for e in result["loss_log"]]
    # The log spans the kills, nothing lost or repeated: step 1, then every 2 steps.
    assert logged == [1, *range(2, 33, 2)]
    assert [p.name for p in scratch.iterdir()] == ["logs"]  # the runs' logs, nothing else

    # The same recipe never interrupted gives the same model, as far as the scores go. Here in
    # the test's process (Ray Train's local mode: sbertray stores the checkpoints itself), with
    # the pairs, the checkpoints (the newest 2 kept) and the model in object storage.
    pairs = load_pairs(PairDataConfig(path=str(REPO / "jobs/samples/concept_pairs.csv")))
    fs, bucket_path = s3_server.filesystem(), s3_prefix[len("s3://") :]
    with fs.open_output_stream(f"{bucket_path}/pairs/part-0.parquet") as f:
        pq.write_table(pairs.table, f)
    whole = [
        f"train.path={s3_prefix}/pairs",
        f"output.model={s3_prefix}/model",
        f"output.checkpoints={s3_prefix}/checkpoints",
        "output.keep_checkpoints=true",
        "scaling.num_workers=0",
    ]
    assert train(load_config(TrainConfig, recipe, [*settings, *whole])).global_step == 32
    listing = fs.get_file_info(pafs.FileSelector(bucket_path, recursive=True))
    names = {info.path[len(bucket_path) + 1 :] for info in listing}
    for expected in (
        "model/model.safetensors",
        "model/README.md",
        "model/train_result.json",
        "model/modules.json",
        "model/2_Normalize/config.json",
    ):
        assert expected in names, expected
    kept = sorted(n.split("/")[-2] for n in names if n.endswith(checkpoints.MARKER))
    assert kept == [checkpoints.dir_name(24), checkpoints.dir_name(32)]  # the newest 2, marked
    assert len([n for n in names if n.endswith("trainer_state.json")]) == 2

    from sentence_transformers import SentenceTransformer

    from sbertray.modeling import load_model

    resumed = evaluate_model(SentenceTransformer(str(tmp_path / "model"), device="cpu"), pairs)
    # Downloaded into the node's model cache.
    uninterrupted = evaluate_model(load_model(f"{s3_prefix}/model", device="cpu"), pairs)
    assert resumed.spearman_cosine == pytest.approx(uninterrupted.spearman_cosine, abs=0.002)


def test_a_changed_recipe_does_not_resume_the_old_run(
    ray_2cpu, tmp_path, monkeypatch, tiny_model_path
):
    """Retraining into the same output with another learning rate trains from step 0, and the
    card and train_result.json describe the run that happened. The output is relative: Ray
    Train workers run in their own directory, yet it means the driver's (the README demo uses
    one). The first run trains in this process (`scaling.num_workers: 0`), the retraining on a
    Ray Train worker."""
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("SBERTRAY_SCRATCH", str(scratch))
    monkeypatch.chdir(tmp_path)
    recipe = REPO / "jobs/configs/resume_roles.yaml"
    base = [
        f"train.path={REPO / 'jobs/samples/resume_roles.jsonl'}",
        f"base_model={tiny_model_path}",
        "training.epochs=2",
        "output.model=rel/model",
    ]
    first = train(load_config(TrainConfig, recipe, [*base, "scaling.num_workers=0"]))
    assert first.resumed_from_step == 0 and first.global_step == 6  # 24 pairs / 8, 2 epochs
    assert not list(scratch.glob("*")), "a completed run removes its scratch"
    model = tmp_path / "rel" / "model"
    assert first.model_url == str(model) and (model / "report.md").exists()

    retrain = [*base, "training.learning_rate=1.0e-4", "training.max_steps=1"]
    changed = train(load_config(TrainConfig, recipe, retrain))
    assert changed.resumed_from_step == 0 and changed.global_step == 1
    card = (model / "README.md").read_text()
    assert "0.0001" in card and "resumed from step" not in card
    summary = summarize("rel/model")
    # One step is enough for a loss on record (and its plot): no "loss nan -> nan".
    assert summary.startswith("train resume_roles: 1 step,") and "loss.png" in summary
    assert "nan" not in summary
    weights = model / "model.safetensors"
    written = weights.stat().st_mtime_ns
    same = train(load_config(TrainConfig, recipe, retrain))
    assert same.kept and same.global_step == 1  # the same run: kept as is
    assert weights.stat().st_mtime_ns == written


def test_a_run_in_the_driver_stores_its_checkpoints_and_resumes_from_them(
    ray_2cpu, tmp_path, tiny_model_path
):
    """`scaling.num_workers: 0` trains in this process (Ray Train's local mode, which stores no
    checkpoint): sbertray stores and marks its checkpoints, keeps the newest
    `training.keep_checkpoints`, and a rerun after a crash resumes from the newest complete
    one to the weights of the run never interrupted."""
    from safetensors.numpy import load_file

    config = load_config(
        TrainConfig,
        REPO / "jobs/configs/resume_roles.yaml",
        [
            f"train.path={REPO / 'jobs/samples/resume_roles.jsonl'}",
            f"base_model={tiny_model_path}",
            "scaling.num_workers=0",
            "training.epochs=2",
            "training.checkpoint_steps=2",
            "output.keep_checkpoints=true",
            f"output.model={tmp_path / 'model'}",
        ],
    )
    first = train(config)
    assert first.global_step == 6 and first.num_workers == 0 and first.resumed_from_step == 0
    root = tmp_path / "model-checkpoints"
    assert _complete_checkpoints(root) == [4, 6]  # training.keep_checkpoints: 2
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))

    # As if the run had died after step 4: no model yet, no checkpoint of step 6.
    (tmp_path / "model" / "train_result.json").unlink()
    for marker in root.glob(f"*/{checkpoints.dir_name(6)}/{checkpoints.MARKER}"):
        marker.unlink()
    resumed = train(config)
    assert resumed.resumed_from_step == 4 and resumed.global_step == 6
    # Equal to float noise (1.4e-5 seen): less than one optimizer step at lr 5e-5 apart.
    again = load_file(str(tmp_path / "model" / "model.safetensors"))
    for name, tensor in weights.items():
        assert abs(again[name] - tensor).max() < 5e-5, name


def test_ray_train_settings_keep_the_users_and_are_undone(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    with ray_train_settings(many_nodes=False):
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"
        assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    with ray_train_settings(many_nodes=True):
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
        assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ  # spot nodes may go
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in os.environ


def test_a_ray_without_dashboard_asks_no_other_rays_state_api(ray_2cpu):
    """Ray Train's placement-group cleaner asks the State API whether its run's controller is
    alive. On a Ray without a dashboard the question must fail, not go to whatever listens on
    127.0.0.1:8265 (another Ray's dashboard: no such controller there, so the cleaner removed a
    live run's placement group)."""

    @ray_2cpu.remote(num_cpus=0)
    def ask() -> str:
        from ray.util.state import list_actors
        from ray.util.state.exception import RayStateApiException

        try:
            list_actors()
        except RayStateApiException as exc:
            return str(exc)
        return "answered"

    answer = ray_2cpu.get(ask.remote())
    assert answer != "answered" and "127.0.0.1:8265" not in answer, answer
