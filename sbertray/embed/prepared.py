"""The job's model as the embed driver prepares it once, before any actor starts: resolved on
this node, hashed, its ``ModelSpec`` read, and exported for the exported backends."""

from __future__ import annotations

import os
from dataclasses import dataclass

from sbertray.config import EmbedConfig
from sbertray.embed import backends, exported
from sbertray.modeling import ModelSpec, load_model, model_hash, resolve_model_path


@dataclass(frozen=True)
class PreparedModel:
    """A model resolved on the driver, ready for the embedding actors."""

    path: str  # local directory (or hub id) on this node
    model_hash: str
    spec: ModelSpec
    exportable: bool  # runs on the backends that run the ONNX export


def prepare_model(path: str, *, export: bool) -> PreparedModel:
    """Hashes the model at ``path`` (resolved by ``resolve_model_path``) and reads its spec.

    With ``export`` (the job may run an exported backend), a supported local model is exported
    once here (cached by hash), so actors start from the export instead of each exporting; later
    runs read the spec off the export without loading the model.
    """
    digest = model_hash(path)
    local = os.path.isdir(path)
    spec = exported.cached_spec(path, digest) if export and local else None
    if spec is not None:
        return PreparedModel(path, digest, spec, exportable=True)
    model = load_model(path, device="cpu")
    exportable = export and local and exported.unsupported_reason(model) is None
    if exportable:
        exported.export(model, path, exported.artifact_dir(path, digest))
    return PreparedModel(path, digest, ModelSpec.of(model), exportable)


def prepare_job_model(config: EmbedConfig) -> PreparedModel:
    """The job's model resolved on this node, hashed, and exported once if the job may run an
    exported backend."""
    return prepare_model(
        resolve_model_path(config.model, config.storage),
        export=backends.may_run_exported(config.compute),
    )
