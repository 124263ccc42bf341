"""Model facts in one place: resolution errors, the content hash, the spec and the export."""

import shutil

import pytest

from sbertray.embed import exported
from sbertray.modeling import ModelError, ModelSpec, model_hash, prepare_model, resolve_model_path


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
    assert resolve_model_path("org/model") == "org/model"  # no local `org/`: a hub id
