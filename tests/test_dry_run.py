"""`--dry-run`: the checks of the real run, the plan and an estimate, and nothing written. The
runs are `sbertray` in this process, on the session's Ray (``sbertray_main``)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_embed_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_model_path, sbertray_main):
    out = tmp_path / "out"
    config = str(REPO / "jobs/configs/embed_demo.yaml")
    # Overrides are taken after a flag too (argparse alone would refuse `output.path=...`).
    code, plan, err = sbertray_main(
        "embed", config, f"model={tiny_model_path}", "--dry-run", f"output.path={out}"
    )
    assert code == 0, err[-3000:]
    assert "input: 3 files, 36 rows, 2 units; 0 already committed, 36 rows to embed" in plan
    assert "(id, language, source, embedding, topk_ids, topk_scores, content_key)" in plan
    assert "backend " in plan and "rows/s per actor on " in plan
    assert "estimate: " in plan
    assert not out.exists()

    code, _, err = sbertray_main(
        "embed", config, f"output.path={out}", "input.text_column=nope", "--dry-run"
    )
    assert code == 2 and "missing column `nope` (input.text_column)" in err
    assert not out.exists()


def test_train_dry_run_counts_steps_and_writes_nothing(tmp_path, tiny_model_path, sbertray_main):
    model = tmp_path / "model"
    recipe = str(REPO / "jobs/configs/concepts.yaml")
    code, plan, err = sbertray_main(
        "train", recipe, f"base_model={tiny_model_path}", f"output.model={model}", "--dry-run"
    )
    assert code == 0, err[-3000:]
    # 40 pairs, global batch 10: 4 steps an epoch, 5 epochs.
    assert "training 40 pairs: 20 steps of global batch 10 on 1 worker(s)" in plan
    assert "resume: none, training from step 0" in plan
    assert "s per step for one worker here" in plan
    assert not model.exists() and not (tmp_path / "model-checkpoints").exists()

    missing = f"train.path={tmp_path / 'none.csv'}"
    code, _, err = sbertray_main("train", recipe, f"output.model={model}", missing, "--dry-run")
    assert code == 2 and "none.csv: no such file or directory" in err


def test_dry_run_and_run_find_a_null_text_before_any_embedding(
    tmp_path, tiny_model_path, sbertray_main
):
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
        code, out_text, err = sbertray_main("embed", config, *args, *common, *extra)
        assert code == 2 and "part-1.parquet: row 5: column `text`: null text" in err, err[-2000:]
        assert "rows (" not in out_text  # no progress line: nothing was embedded
    assert not list(out.rglob("*.parquet"))


def test_an_output_written_with_other_settings_is_refused_unless_replaced(
    tmp_path, tiny_model_path, sbertray_main
):
    out = tmp_path / "out"
    config = str(REPO / "jobs/configs/embed_demo.yaml")
    args = [f"model={tiny_model_path}", f"output.path={out}"]
    assert sbertray_main("embed", config, *args)[0] == 0

    for extra in (["--dry-run"], []):
        code, _, err = sbertray_main(
            "embed", config, *args, "output.embedding_dtype=float16", *extra
        )
        assert (
            code == 2
            and "holds rows written with other settings (`output.embedding_dtype`: " in err
        )
        assert "'float32' -> 'float16'" in err and "--replace" in err
    assert (
        pq.read_schema(next(out.rglob("*.parquet"))).field("embedding").type.value_type == "float"
    )

    code, _, err = sbertray_main(
        "embed", config, *args, "output.embedding_dtype=float16", "--replace"
    )
    assert code == 0, err[-3000:]
    types = {pq.read_schema(f).field("embedding").type.value_type for f in out.rglob("*.parquet")}
    assert types == {pa.float16()}
    code, again, _ = sbertray_main("embed", config, *args, "output.embedding_dtype=float16")
    assert code == 0 and "nothing to do" in again


def test_relative_paths_are_read_from_the_current_directory_and_errors_say_so(
    tmp_path, monkeypatch, sbertray_main
):
    """Recipes are written relative to the repository root, where jobs are submitted from:
    run elsewhere, the error names the directory the path was read from."""
    monkeypatch.chdir(tmp_path)
    code, _, err = sbertray_main("embed", str(REPO / "jobs/configs/embed_demo.yaml"), "--dry-run")
    assert code == 2
    assert (
        "input `jobs/samples/courses`: no such file or directory (relative paths are read from "
        f"the current directory, {tmp_path})"
    ) in err
