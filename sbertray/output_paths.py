"""Where a job's outputs may go: not inside the temporary copy of a Ray job's working
directory, and on a cluster of many nodes not on one node's local disk."""

from __future__ import annotations

from sbertray.config import EmbedOutputConfig, StorageConfig
from sbertray.storage import StorageError, absolute, is_local, join

# Where Ray unpacks a job's `--working-dir`: deleted with the job (or the cluster).
_JOB_PACKAGE = "/runtime_resources/working_dir_files/"


# A Lance output's own files beside the dataset: the unit parts, manifest, report and lock.
LANCE_PARTS_DIR = "_sbertray"


def embed_parts_url(output: EmbedOutputConfig) -> str:
    """Where an embed run writes its parts and records: the output itself for Parquet, beside
    the dataset for Lance (``embed/lance_sink.py``)."""
    return join(output.path, LANCE_PARTS_DIR) if output.format == "lance" else output.path


def check_lasting(paths: dict[str, str]) -> None:
    """Refuses outputs (config key -> path) inside the temporary copy of a Ray job's working
    directory, where a relative output path of a `ray job submit` lands."""
    doomed = {key: path for key, path in paths.items() if path and _JOB_PACKAGE in absolute(path)}
    _refuse(
        doomed,
        "inside this Ray job's temporary copy of its working directory, which is deleted with "
        "the job. Give an object-storage URL (s3://, gs://, ...) or an absolute path outside it",
    )


def check_shared(paths: dict[str, str], storage: StorageConfig) -> None:
    """Refuses local ``paths`` (config key -> path) not under ``storage.shared_paths``: on a
    cluster of many nodes each node would write to its own disk, not where the user looks."""
    shared = [absolute(p).rstrip("/") + "/" for p in storage.shared_paths]
    local = {
        key: path
        for key, path in paths.items()
        if path and is_local(path) and not any((absolute(path) + "/").startswith(s) for s in shared)
    }
    _refuse(
        local,
        "a local path, but this Ray cluster has (or may add) more than one node, and each node "
        "would write to its own disk. Use an object-storage URL (s3://, gs://, ...) or a folder "
        "every node mounts, listed in `storage.shared_paths`",
    )


def _refuse(paths: dict[str, str], why: str) -> None:
    """One error naming every refused ``config key: path`` and why."""
    if paths:
        listed = ", ".join(f"`{key}: {path}`" for key, path in paths.items())
        raise StorageError(f"{listed}: {why}")
