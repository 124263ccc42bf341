"""Model facts in one place: resolution errors, the content hash, the spec and the export."""

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from sbertray import storage
from sbertray.embed import exported
from sbertray.embed.prepared import prepare_model
from sbertray.modeling import ModelError, ModelSpec, model_hash, resolve_model_path


def test_model_hash_follows_the_weights_not_the_card_or_location(tmp_path, bundled_model_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundled_model_path, copy, ignore=shutil.ignore_patterns("onnx"))
    digest = model_hash(bundled_model_path)
    assert model_hash(copy) == digest
    (copy / "README.md").write_text("a new card")
    assert model_hash(copy) == digest
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert model_hash(copy) != digest
    assert model_hash("org/model") == model_hash("org/model") != model_hash("org/other")


def test_prepare_exports_once_then_reads_the_spec_without_loading(
    tmp_path, bundled_model_path, base_model, monkeypatch
):
    local = tmp_path / "model"
    shutil.copytree(bundled_model_path, local, ignore=shutil.ignore_patterns("onnx"))
    first = prepare_model(str(local), export=True)
    assert first.exportable and first.spec == ModelSpec.of(base_model)
    assert exported.artifact_dir(str(local), first.model_hash).parent == local / "onnx"
    import sbertray.modeling as modeling

    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    again = prepare_model(str(local), export=True)
    assert (again.model_hash, again.spec, again.exportable) == (first.model_hash, first.spec, True)


@pytest.mark.parametrize("name", ["./runs/nomodel", "/no/such/model", "runs/a/b", "runs/nomodel"])
def test_a_missing_local_model_is_named_at_once(name, tmp_path, monkeypatch):
    """A path that does not exist is an error naming it, never a minute of hub retries."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelError, match=f"model `{name}`: no such directory"):
        resolve_model_path(name)
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        resolve_model_path("org/model")  # no local `org/`: a hub id, and not one cached


def test_an_unreachable_hub_is_one_quick_error(tmp_path, sbertray_main):
    """A hub id that is not cached, with the hub unreachable (a closed loopback port stands in
    for a machine without internet): one error at once, not a minute of retries."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: connections are refused
    (tmp_path / "pairs.csv").write_text("sentence_0,sentence_1,label\na,b,0.5\nc,d,0.1\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"))
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "sbertray", "evaluate", "someone/no-such-model", "pairs.csv"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.time() - started < 30
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "someone/no-such-model`: not a local folder, not in the Hugging Face cache" in proc.stderr
    )
    # This process runs with HF_HUB_OFFLINE=1 (conftest.py).
    code, _, err = sbertray_main("evaluate", "someone/no-such-model", str(tmp_path / "pairs.csv"))
    assert code == 2 and "HF_HUB_OFFLINE is set" in err


def test_a_remote_model_is_downloaded_once_per_node_and_checked_against_its_hash(
    s3_prefix, bundled_model_path, tmp_path, monkeypatch
):
    monkeypatch.setenv("SBERTRAY_CACHE", str(tmp_path / "node-cache"))
    url = f"{s3_prefix}/base"
    storage.upload_dir(bundled_model_path, storage.resolve(url))
    downloads = []
    real_download = storage.download_dir
    monkeypatch.setattr(
        storage, "download_dir", lambda *a: downloads.append(a) or real_download(*a)
    )
    expected = model_hash(bundled_model_path)

    # Four actors of one node starting together: one downloads, the others wait and share it.
    with ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(lambda _: resolve_model_path(url, None, expected), range(4)))
    assert len(downloads) == 1 and len(paths) == 1
    assert model_hash(paths.pop()) == expected

    with pytest.raises(ModelError, match="changed during the run"):
        resolve_model_path(url, None, "0" * 64)
    # A new version at the same URL is a new download, never the stale copy.
    storage.write_bytes(storage.resolve(f"{url}/vocab_extra.txt"), b"new")
    newer = resolve_model_path(url)
    assert len(downloads) == 2 and model_hash(newer) != expected
