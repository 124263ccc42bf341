"""Which checkpoint a rerun resumes from.

Ray Train restores the last checkpoint its controller *registered*; one that was fully
uploaded when the run was killed but not yet registered was lost, and the rerun started over.
And it restored whatever the last run with the same name left, even after the recipe, the data
or the base model changed, so a "retrain" silently reused old steps.

So each run's Ray Train name carries the run's fingerprint, a hash of everything that decides
the optimizer's trajectory (a changed recipe is a new run), and rank 0 marks each checkpoint
once Ray Train's synchronous upload has returned. A rerun resumes from the newest marked
checkpoint of its own run, registered or not.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from sbertray import storage
from sbertray.config import TrainConfig, dump_without, stable_hash

MARKER = "_sbertray_complete.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# Keys that never change the weights a step produces: a rerun changing only these resumes.
_NOT_IN_FINGERPRINT = {
    "name": None,
    "tune": None,  # the search around a recipe, not the run itself
    "output": None,
    "storage": None,
    "scaling": {"max_failures", "cpus_per_worker"},
    "training": {"logging_steps", "checkpoint_steps", "keep_checkpoints"},
}


def dir_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def run_fingerprint(config: TrainConfig, data: list[str | None], base_model_hash: str) -> str:
    """The hash of the recipe's training-relevant keys, the validated pairs (their digests: the
    training set's from ``prepare``, the dev set's ``table_hash``) and the base model."""
    settings = dump_without(config, _NOT_IN_FINGERPRINT)
    return stable_hash({"config": settings, "data": data, "base_model": base_model_hash})


def table_hash(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()


@dataclass(frozen=True)
class CheckpointStore:
    """The checkpoints of run ``name`` (``<base>-<fingerprint[:8]>``) under ``parent``, Ray
    Train's storage path."""

    parent: storage.Location
    name: str

    @property
    def root(self) -> storage.Location:
        return self.parent.child(self.name)

    def unmark(self, step: int) -> None:
        """Before a checkpoint is (re)written: a half-written one must never look complete."""
        storage.delete(self.root.child(dir_name(step), MARKER))

    def mark(self, step: int) -> None:
        marker = self.root.child(dir_name(step), MARKER)
        storage.write_bytes(marker, json.dumps({"step": step}).encode())

    def save(self, step: int, local_dir: Path, keep: int) -> None:
        """Stores a checkpoint where Ray Train would, marks it complete and keeps the newest
        ``keep``, as Ray Train's ``num_to_keep`` does: for a run in the driver's process
        (``scaling.num_workers: 0``), whose Ray Train (local mode) stores nothing."""
        storage.upload_dir(local_dir, self.root.child(dir_name(step)))
        self.mark(step)
        # Complete ones only: an S3 server may still list a deleted checkpoint's folder.
        for old in self._complete_steps()[:-keep]:
            storage.delete(self.root.child(dir_name(old)))

    def _dirs(self, loc: storage.Location) -> list[str]:
        try:
            infos = loc.fs.get_file_info(storage.pafs.FileSelector(loc.path, allow_not_found=True))
        except OSError as exc:
            raise storage.StorageError(f"cannot list {storage.redact(loc.url)}: {exc}") from exc
        return [i.base_name for i in infos if i.type == storage.pafs.FileType.Directory]

    def other_runs(self) -> list[str]:
        """Runs into the same output made with another fingerprint."""
        base = self.name.rsplit("-", 1)[0]
        return sorted(
            d for d in self._dirs(self.parent) if d.startswith(f"{base}-") and d != self.name
        )

    def latest_step(self) -> int:
        """The step of the newest complete checkpoint, 0 when there is none."""
        return max(self._complete_steps(), default=0)

    def _complete_steps(self) -> list[int]:
        return sorted(
            int(match.group(1))
            for d in self._dirs(self.root)
            if (match := _CHECKPOINT_DIR.match(d)) and storage.exists(self.root.child(d, MARKER))
        )

    def restore(self, target: Path) -> tuple[str | None, int]:
        """Downloads the newest complete checkpoint into ``target``; returns (its local path,
        its step), or (None, 0) when there is none."""
        step = self.latest_step()
        if not step:
            return None, 0
        storage.download_dir(self.root.child(dir_name(step)), target)
        return str(target), step
