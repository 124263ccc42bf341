"""What a user sees, running the README's demo: sbertray's own lines on the console, the rest
in a run log published beside the outputs; `-v` brings it all back."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from processes import run, sbertray_cmd

from sbertray.console import RunLog

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
_NOISE = re.compile(r"Warning|Traceback|DeprecationWarning|pid=\d+")


def _console(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


@pytest.mark.long
def test_the_demo_twice_then_verbose(tmp_path, monkeypatch, tiny_model_path):
    """`bash scripts/demo.sh` twice. The first run's console shows sbertray's own lines, the
    rest is in the run log beside the outputs. The second training keeps the model (same
    recipe, data and base model), so its hash is the same and the embed step has nothing to
    do. A completed training leaves no checkpoints behind. `-v` shows the rest too."""
    monkeypatch.setenv("SBERTRAY_PROGRESS_EVERY_S", "0")  # a progress line per unit, off a tty
    model, out = tmp_path / "model", tmp_path / "emb"
    train_cmd = sbertray_cmd(
        "train",
        str(REPO / "jobs/configs/courses.yaml"),
        f"base_model={tiny_model_path}",
        "training.epochs=1",
        f"output.model={model}",
    )
    embed_args = [str(REPO / "jobs/configs/embed_demo.yaml"), f"model={model}"]
    train = run(train_cmd)
    assert train.returncode == 0, train.stderr[-3000:]
    lines = _console(train)
    assert len(lines) <= 12, "\n".join(lines)
    assert not [line for line in lines if _NOISE.search(line)], "\n".join(lines)
    assert "[sbertray] step 1/1" in train.stdout and "[sbertray] full log: " in train.stdout
    log = (model / "run.log").read_text()
    assert "RayTrainWorker pid=" in log and "[sbertray] step 1/1" in log  # Ray's lines kept
    assert not (tmp_path / "model-checkpoints").exists()
    weights = (model / "model.safetensors").stat().st_mtime_ns

    embed = run(sbertray_cmd("embed", *embed_args, f"output.path={out}"))
    assert embed.returncode == 0, embed.stderr[-3000:]
    lines = _console(embed)
    assert len(lines) <= 12, "\n".join(lines)
    assert not [line for line in lines if _NOISE.search(line)], "\n".join(lines)
    progress = re.findall(r"\[sbertray\] (\d+)/(\d+) rows", embed.stdout)
    assert progress and progress[-1] == ("36", "36"), embed.stdout  # real counts, right total
    assert "input ids `course_id` are the output's `id` column" in embed.stdout
    assert (out / "_report" / "run.log").exists()

    again = run(train_cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "was trained with this recipe, data and base model" in again.stdout
    assert "keeping it (--restart trains it again)" in again.stdout
    assert "[sbertray] step " not in again.stdout
    assert (model / "model.safetensors").stat().st_mtime_ns == weights
    embedded = run(sbertray_cmd("embed", *embed_args, f"output.path={out}"))
    assert embedded.returncode == 0 and "nothing to do" in embedded.stdout, embedded.stdout

    verbose = run(sbertray_cmd("-v", "embed", *embed_args, f"output.path={tmp_path / 'emb2'}"))
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert len(_console(verbose)) > 3 * len(lines)  # Ray's and the libraries' lines are back
    assert "Logging error" not in verbose.stdout + verbose.stderr


def test_ctrl_c_says_what_is_kept_without_a_traceback(monkeypatch, capsys):
    from sbertray import cli, console

    def interrupted(args):
        raise KeyboardInterrupt

    # A stopped command shuts its Ray down: here that would be this pytest worker's Ray, and
    # the next test's first Ray call would start another one without sbertray's settings.
    shut_down = []
    monkeypatch.setattr(console, "_shut_down_ray", lambda: shut_down.append(True))
    monkeypatch.setattr(cli, "_cmd_embed", interrupted)
    assert cli.main(["embed", "any.yaml"]) == 130  # the shell's status for SIGINT
    err = capsys.readouterr().err
    assert "sbertray embed: stopped (KeyboardInterrupt); what was committed is kept" in err
    assert "Traceback" not in err
    assert shut_down == [True]


def test_a_handler_made_while_the_log_was_open_writes_to_the_console_after(
    tmp_path, monkeypatch, capfd
):
    """Ray makes its logging handler on first import, inside the run log: its shutdown at exit
    logs through it after the log file is closed (once a "--- Logging error ---" with -v)."""
    monkeypatch.setenv("SBERTRAY_SCRATCH", str(tmp_path))
    late = logging.getLogger("sbertray-test-late")
    with RunLog("embed", verbose=True):
        handler = logging.StreamHandler()  # takes sys.stderr as it is now, as Ray's does
        late.addHandler(handler)
        late.addHandler(looks_up := logging._StderrHandler())  # finds sys.stderr per record
    try:
        late.warning("a line after the log closed")
    finally:
        late.removeHandler(handler)
        late.removeHandler(looks_up)
    err = capfd.readouterr().err
    assert "a line after the log closed" in err and "Logging error" not in err
