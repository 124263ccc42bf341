"""A lock object in the output location, so two runs never write the same prefix at once.

Object stores have no atomic create-if-absent that every backend supports, so the lock is
write-then-verify: read the lock, write ours if there is none (or it is stale), read it back and
make sure it is still ours. On a local filesystem an absent lock is created atomically
(a hard link, which fails if the name exists), which settles a race at once instead of after
the verify delay. The owner refreshes a heartbeat; a lock whose heartbeat is older than
``stale_after_s``, or whose owner process is gone from this same host, is taken over with a
warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import warnings

from sbertray import storage
from sbertray.errors import UserError

LOCK_NAME = "_lock.json"
# Time for a concurrent writer's lock to become visible before we trust that ours won.
_VERIFY_DELAY_S = 0.5


class LockError(UserError, RuntimeError):
    """Another live run holds the output location."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """Context manager holding ``<output>/_lock.json`` for one run."""

    def __init__(
        self,
        out: storage.Location,
        run_id: str,
        *,
        stale_after_s: float = 600.0,
        heartbeat_s: float = 30.0,
    ):
        self.loc = out.child(LOCK_NAME)
        self.run_id = run_id
        self.stale_after_s = stale_after_s
        self.heartbeat_s = min(heartbeat_s, stale_after_s / 3)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat": time.time(),
        }

    def _read(self) -> dict | None:
        if not storage.exists(self.loc):
            return None
        try:
            return json.loads(storage.read_bytes(self.loc))
        except (json.JSONDecodeError, storage.StorageError):
            return None  # half-visible or deleted meanwhile: treat as free

    def _is_stale(self, lock: dict) -> str | None:
        age = time.time() - float(lock.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f}s old"
        if lock.get("host") == socket.gethostname() and not _pid_alive(int(lock.get("pid", -1))):
            return f"its process {lock.get('pid')} on this host is gone"
        return None

    def acquire(self) -> None:
        if not self._create_absent():
            self._take()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _create_absent(self) -> bool:
        """On a local filesystem: creates the lock if there is none, atomically and whole (a
        hard link of a finished temp file, so no reader sees it empty). False when the location
        is remote or a lock is there already (live, stale or just created)."""
        if not self.loc.is_local:
            return False
        os.makedirs(os.path.dirname(self.loc.path), exist_ok=True)
        tmp = f"{self.loc.path}.{self.run_id}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(json.dumps(self._record()).encode())
        try:
            os.link(tmp, self.loc.path)
        except OSError:  # the name exists, or hard links are not supported: write-then-verify
            return False
        finally:
            os.unlink(tmp)
        return True

    def _take(self) -> None:
        """Write-then-verify, for object stores and for taking over a stale lock."""
        current = self._read()
        if current is not None and current.get("run_id") != self.run_id:
            why = self._is_stale(current)
            if why is None:
                raise LockError(
                    f"{storage.redact(self.loc.url)} is held by run {current.get('run_id')} "
                    f"(host {current.get('host')}, pid {current.get('pid')}); wait for it to "
                    f"finish, or it goes stale {self.stale_after_s:.0f}s after its last heartbeat"
                )
            warnings.warn(
                f"taking over the lock of run {current.get('run_id')}: {why}", stacklevel=2
            )
        storage.write_bytes(self.loc, json.dumps(self._record()).encode())
        time.sleep(_VERIFY_DELAY_S)
        check = self._read()
        if check is None or check.get("run_id") != self.run_id:
            raise LockError(
                f"lost the race for {storage.redact(self.loc.url)} to run "
                f"{(check or {}).get('run_id')}"
            )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            # A missed beat is retried next time; staleness needs many in a row.
            with contextlib.suppress(storage.StorageError):
                storage.write_bytes(self.loc, json.dumps(self._record()).encode())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self._read()
        if current is not None and current.get("run_id") == self.run_id:
            storage.delete(self.loc)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
