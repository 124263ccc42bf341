"""What the console shows while a command runs: sbertray's own lines (what it will do, progress,
warnings that matter, the result). Everything else, Ray's banners and its workers' logs and
library warnings included, goes to the run log file, which the console names and which is
published next to the run's report. ``sbertray -v`` shows it all on the console too.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time

from sbertray import storage
from sbertray.ray_runtime import ray_running

# Ray prefixes a worker's lines with "(ActorName pid=123, ip=...)", colored on terminals.
_RAY_PREFIX = re.compile(r"^(\x1b\[[\d;]*m)?\([\w.:-]+ pid=\d+(, ip=[\d.]+)?\)(\x1b\[0m)? ?")
LOG_NAME = "run.log"


def _ours(line: str) -> bool:
    return "[sbertray" in line or line.startswith("sbertray ")


class _Filter(io.TextIOBase):
    """A stream that writes every line to the log file and sbertray's lines to the console."""

    def __init__(self, console, log, verbose: bool):
        self.console, self.log, self.verbose = console, log, verbose
        self._partial = ""

    def isatty(self) -> bool:
        return self.console.isatty()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if self.verbose:
                self.console.write(line + "\n")
            elif _ours(line):
                self.console.write(_RAY_PREFIX.sub("", line) + "\n")
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()


def console_stream():
    """The terminal itself, for progress bars drawn in place while a ``RunLog`` is open."""
    return getattr(sys.stdout, "console", sys.stdout)


def _repoint_handlers(streams: dict) -> None:
    """Logging handlers created while the log was open (Ray's, when it is first imported) keep
    the stream they found: point them at the one it replaced, or Ray's shutdown at exit logs
    into a closed file ("--- Logging error ---" with ``-v``). Handlers that look up
    ``sys.stderr`` on each record (logging's ``_StderrHandler``) hold no stream of their own."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            held = vars(handler).get("stream")
            if held is not None and held in streams:
                handler.setStream(streams[held])


def _shut_down_ray() -> None:
    if ray_running():
        import ray

        ray.shutdown()


class RunLog:
    """Routes this process's output for one command; ``publish`` copies the log beside the
    command's outputs."""

    def __init__(self, command: str, *, verbose: bool = False):
        folder = storage.scratch_root() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        self.path = folder / f"{command}-{stamp}-{os.getpid()}.log"
        self.verbose = verbose

    def __enter__(self) -> RunLog:
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._saved = sys.stdout, sys.stderr
        sys.stdout.flush()
        sys.stderr.flush()
        # Ray's C++ core writes straight to file descriptor 2, past sys.stderr: point that
        # descriptor at the log, and give the console its own copy of the terminal.
        self._console_fd = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        console_err = open(self._console_fd, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stdout = _Filter(sys.stdout, self._file, self.verbose)
        sys.stderr = _Filter(console_err, self._file, self.verbose)
        # Python logging: everything to the file; warnings and up also to the console when
        # verbose (the filter shows them then).
        logging.basicConfig(
            level=logging.DEBUG if self.verbose else logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            force=True,
        )
        print(f"[sbertray] log: {self.path}", flush=True)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and issubclass(exc_type, SystemExit | KeyboardInterrupt):
            # Stopped by a signal (Ray's driver handler turns SIGTERM into SystemExit): Ray's
            # teardown lines about the tasks and actors it kills go to the log, not the console.
            _shut_down_ray()
        sys.stdout.flush()
        sys.stderr.flush()
        _repoint_handlers({sys.stdout: self._saved[0], sys.stderr: self._saved[1]})
        sys.stdout, sys.stderr = self._saved
        os.dup2(self._console_fd, 2)
        os.close(self._console_fd)
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)
        self._file.close()

    def publish(self, folder_url: str, storage_config=None) -> str:
        """Copies the log so far to ``<folder_url>/run.log``; returns that URL."""
        sys.stdout.flush()
        sys.stderr.flush()
        target = storage.resolve(folder_url, storage_config).child(LOG_NAME)
        storage.write_bytes(target, self.path.read_bytes())
        return storage.redact(target.url)
