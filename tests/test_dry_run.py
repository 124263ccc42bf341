"""`--dry-run`: the checks of the real run, the plan and an estimate, and nothing written."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from processes import cli_env, run, sbertray_cmd

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_embed_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_model_path):
    out = tmp_path / "out"
    config = str(REPO / "jobs/configs/embed_demo.yaml")
    # Overrides are taken after a flag too (argparse alone would refuse `output.path=...`).
    plan = run(
        sbertray_cmd("embed", config, f"model={tiny_model_path}", "--dry-run", f"output.path={out}")
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "input: 3 files, 36 rows, 2 units; 0 already committed, 36 rows to embed" in plan.stdout
    assert "(id, language, source, embedding, topk_ids, topk_scores, content_key)" in plan.stdout
    assert "backend " in plan.stdout and "rows/s per actor on " in plan.stdout
    assert "estimate: " in plan.stdout and "Traceback" not in plan.stderr
    assert not out.exists()

    bad = run(
        sbertray_cmd("embed", config, f"output.path={out}", "input.text_column=nope", "--dry-run")
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "missing column `nope` (input.text_column)" in bad.stderr
    assert not out.exists()


def test_train_dry_run_counts_steps_and_writes_nothing(tmp_path, tiny_model_path):
    model = tmp_path / "model"
    plan = run(
        sbertray_cmd(
            "train",
            str(REPO / "jobs/configs/concepts.yaml"),
            f"base_model={tiny_model_path}",
            f"output.model={model}",
            "--dry-run",
        )
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    # 40 pairs, global batch 10: 4 steps an epoch, 5 epochs.
    assert "training 40 pairs: 20 steps of global batch 10 on 1 worker(s)" in plan.stdout
    assert "resume: none, training from step 0" in plan.stdout
    assert "s per step for one worker here" in plan.stdout
    assert not model.exists() and not (tmp_path / "model-checkpoints").exists()

    bad = run(
        sbertray_cmd(
            "train",
            str(REPO / "jobs/configs/concepts.yaml"),
            f"output.model={model}",
            f"train.path={tmp_path / 'none.csv'}",
            "--dry-run",
        )
    )
    assert bad.returncode == 2 and "none.csv: no such file or directory" in bad.stderr


def test_dry_run_and_run_find_a_null_text_before_any_embedding(tmp_path, tiny_model_path):
    """The pre-flight both share: footer statistics count the null, its file is read to name
    the row, and neither run embeds anything (the default `on_null_text: fail`)."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for part in range(3):
        texts = [f"text {part}-{i}" for i in range(100)]
        if part == 1:
            texts[5] = None
        ids = list(range(part * 100, (part + 1) * 100))
        pq.write_table(pa.table({"id": ids, "text": texts}), inp / f"part-{part}.parquet")
    args = [f"model={tiny_model_path}", f"input.path={inp}", f"output.path={out}"]
    config = str(REPO / "jobs/configs/embed_demo.yaml")
    common = [
        "input.id_column=id",
        "input.text_column=text",
        "input.passthrough=[]",
        "reference=null",
    ]
    for extra in (["--dry-run"], []):
        result = run(sbertray_cmd("embed", config, *args, *common, *extra))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "part-1.parquet: row 5: column `text`: null text" in result.stderr
        assert "rows (" not in result.stdout  # no progress line: nothing was embedded
    assert not list(out.rglob("*.parquet"))


def test_an_output_written_with_other_settings_is_refused_unless_replaced(
    tmp_path, tiny_model_path
):
    out = tmp_path / "out"
    config = str(REPO / "jobs/configs/embed_demo.yaml")
    args = [f"model={tiny_model_path}", f"output.path={out}"]
    assert run(sbertray_cmd("embed", config, *args)).returncode == 0

    for extra in (["--dry-run"], []):
        changed = run(
            sbertray_cmd("embed", config, *args, "output.embedding_dtype=float16", *extra)
        )
        assert changed.returncode == 2 and "Traceback" not in changed.stderr, changed.stderr
        assert (
            "holds rows written with other settings (`output.embedding_dtype`: " in changed.stderr
        )
        assert "'float32' -> 'float16'" in changed.stderr and "--replace" in changed.stderr
    assert (
        pq.read_schema(next(out.rglob("*.parquet"))).field("embedding").type.value_type == "float"
    )

    replaced = run(
        sbertray_cmd("embed", config, *args, "output.embedding_dtype=float16", "--replace")
    )
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    types = {pq.read_schema(f).field("embedding").type.value_type for f in out.rglob("*.parquet")}
    assert types == {pa.float16()}
    again = run(sbertray_cmd("embed", config, *args, "output.embedding_dtype=float16"))
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_relative_paths_are_read_from_the_current_directory_and_errors_say_so(tmp_path):
    """Recipes are written relative to the repository root, where jobs are submitted from:
    run elsewhere, the error names the directory the path was read from."""
    elsewhere = subprocess.run(
        sbertray_cmd("embed", str(REPO / "jobs/configs/embed_demo.yaml"), "--dry-run"),
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert elsewhere.returncode == 2 and "Traceback" not in elsewhere.stderr
    assert (
        "input `jobs/samples/courses`: no such file or directory (relative paths are read from "
        f"the current directory, {tmp_path})"
    ) in elsewhere.stderr
