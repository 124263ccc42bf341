"""One place that turns a URL (local path, ``file://``, ``s3://``, ``gs://``, any fsspec URL) into a
pyarrow filesystem, and the few file operations training and embedding need on top of it.

S3 endpoints come from ``storage.endpoint_url`` in a config or from ``AWS_ENDPOINT_URL``;
credentials come from the usual AWS environment/credential chain and are never logged or
written anywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from sbertray.config import StorageConfig
from sbertray.errors import UserError

# Fail fast when an endpoint is down instead of pyarrow's multi-minute defaults; the retry
# strategy (`storage.max_attempts`) still rides out short outages and throttling (SlowDown /
# 503) with backoff.
_S3_CONNECT_TIMEOUT_S = 5.0
_S3_REQUEST_TIMEOUT_S = 60.0

# Object-store requests are latency bound: reads of many small objects (footers, id columns,
# donor parts) run this many at once.
PARALLEL_READS = 16

_SCHEME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
T = TypeVar("T")
R = TypeVar("R")


class StorageError(UserError, OSError):
    """An object-storage or filesystem operation failed; the message names the URL."""


def is_url(path: str) -> bool:
    return bool(_SCHEME_RE.match(str(path)))


def is_local(path: str) -> bool:
    return not is_url(path) or str(path).startswith("file://")


def relative_note(path: str) -> str:
    """For an error about a relative local path: the directory it was read from."""
    if is_url(path) or os.path.isabs(os.path.expanduser(path)):
        return ""
    return f" (relative paths are read from the current directory, {os.getcwd()})"


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers run in other directories); URLs unchanged."""
    if is_url(path) and not path.startswith("file://"):
        return path
    local = path[len("file://") :] if path.startswith("file://") else path
    return os.path.abspath(os.path.expanduser(local))


# Names that say their value is a secret (`api_key`, `aws_secret`, `token`, `db_password`), as
# config keys and as the last part of `key.path=value` overrides; `token_budget` is not one.
_SECRET_NAME = re.compile(r"(?:^|[_.-])(key|secret|token|password|passwd|credentials?)$", re.I)
_USERINFO = re.compile(r"(://)[^/@\s]+@")
REDACTED = "***"


def scratch_root() -> Path:
    """This machine's folder for a run's local files (run logs; a training worker's
    checkpoints and model before upload): ``$SBERTRAY_SCRATCH``, else
    ``<system temp>/sbertray-scratch``. A completed run removes its own part. Not
    ``<temp>/sbertray``: Python imports a folder of the package's name from the current
    directory as a namespace package, so ``import sbertray`` in a script run from /tmp got
    the logs folder instead of the installed package."""
    default = Path(tempfile.gettempdir()) / "sbertray-scratch"
    return Path(os.environ.get("SBERTRAY_SCRATCH") or default)


def redact(text: str) -> str:
    """Drops every ``user:secret@`` part of the URLs in ``text``, so it can be logged and
    written to manifests, reports and model cards."""
    return _USERINFO.sub(r"\1", str(text))


def redact_arg(arg: str) -> str:
    """A command-line argument fit to write down: URL userinfo dropped, and the value of a
    ``name=value`` override whose name looks like a secret replaced."""
    name, sep, _ = arg.partition("=")
    if sep and _SECRET_NAME.search(name):
        return f"{name}={REDACTED}"
    return redact(arg)


def redact_value(value, key: str = ""):
    """``value`` (a config dump: dicts, lists, strings) with URL userinfo dropped and the
    values of secret-looking keys replaced."""
    if isinstance(value, dict):
        return {k: redact_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(v, key) for v in value]
    if value is not None and _SECRET_NAME.search(key):
        return REDACTED
    return redact(value) if isinstance(value, str) else value


def join(url: str, *parts: str) -> str:
    url = str(url).rstrip("/")
    return "/".join([url, *(p.strip("/") for p in parts if p)])


@dataclass(frozen=True)
class Location:
    """A filesystem plus the path inside it that a URL points at."""

    fs: pafs.FileSystem
    path: str
    url: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, *parts: str) -> Location:
        return Location(self.fs, join(self.path, *parts), join(self.url, *parts))


def endpoint_url(storage: StorageConfig | None) -> str | None:
    if storage is not None and storage.endpoint_url:
        return storage.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _s3_filesystem(storage: StorageConfig | None) -> pafs.S3FileSystem:
    kwargs: dict = {
        "connect_timeout": _S3_CONNECT_TIMEOUT_S,
        "request_timeout": _S3_REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(
            max_attempts=(storage or StorageConfig()).max_attempts
        ),
        "region": (storage.region if storage and storage.region else None)
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
    }
    endpoint = endpoint_url(storage)
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc.rsplit("@", 1)[-1]
        kwargs["scheme"] = parsed.scheme or "https"
        if parsed.username:  # `https://KEY:SECRET@host`, e.g. from ${VAR} references
            kwargs["access_key"] = unquote(parsed.username)
            kwargs["secret_key"] = unquote(parsed.password or "")
    if storage is not None and storage.anonymous:
        kwargs["anonymous"] = True
    return pafs.S3FileSystem(**kwargs)


def resolve(url: str | os.PathLike, storage: StorageConfig | None = None) -> Location:
    """Returns the filesystem and in-filesystem path for ``url``."""
    url = str(url)
    if not is_url(url) or url.startswith("file://"):
        local = url[len("file://") :] if url.startswith("file://") else url
        return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local)), url)
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("s3", "s3a"):
        return Location(_s3_filesystem(storage), url.split("://", 1)[1].rstrip("/"), url)
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return Location(pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path.rstrip("/"), url)


def _wrap(action: str, loc: Location, exc: Exception) -> StorageError:
    return StorageError(f"could not {action} {redact(loc.url)}: {exc}")


def file_info(loc: Location) -> pafs.FileInfo:
    """What is at ``loc`` (a file, a directory, or nothing); a storage failure is one
    ``StorageError`` naming the URL."""
    try:
        return loc.fs.get_file_info(loc.path)
    except OSError as exc:
        raise _wrap("check", loc, exc) from exc


def exists(loc: Location) -> bool:
    return file_info(loc).type != pafs.FileType.NotFound


def list_files(loc: Location) -> list[pafs.FileInfo]:
    """All files below ``loc`` (recursive), sorted by path; hidden/underscore files skipped."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    except OSError as exc:
        raise _wrap("list", loc, exc) from exc
    files = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(loc.path) :].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        files.append(info)
    return sorted(files, key=lambda i: i.path)


def map_parallel(read: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[read(item) for item in items]``, ``PARALLEL_READS`` at a time, in order."""
    with ThreadPoolExecutor(max_workers=PARALLEL_READS) as pool:
        return list(pool.map(read, items))


def read_bytes(loc: Location) -> bytes:
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    except OSError as exc:
        raise _wrap("read", loc, exc) from exc


def write_bytes(loc: Location, data: bytes) -> None:
    """Writes ``data`` so that readers see the old object or the whole new one, never a part.

    S3 PUTs are atomic per object already; on local/POSIX filesystems we write a sibling temp
    file and rename it over the target.
    """
    try:
        parent = loc.path.rsplit("/", 1)[0]
        loc.fs.create_dir(parent, recursive=True)
        if loc.is_local:
            tmp = f"{loc.path}.tmp-{uuid.uuid4().hex}"
            with loc.fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, loc.path)
        else:
            with loc.fs.open_output_stream(loc.path) as f:
                f.write(data)
    except OSError as exc:
        raise _wrap("write", loc, exc) from exc


def check_writable(loc: Location) -> None:
    """Fails if nothing can be written under ``loc``, leaving no trace: locally, the nearest
    existing folder must be a writable folder; in object storage a probe object is written
    and deleted (the only way to know)."""
    if loc.is_local:
        ancestor = Path(loc.path)
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise StorageError(f"output location is not writable: {ancestor} is a file")
        try:  # a real folder made and removed: permissions alone miss /proc, read-only mounts
            os.rmdir(tempfile.mkdtemp(prefix=".sbertray-probe-", dir=ancestor))
        except OSError as exc:
            raise StorageError(
                f"output location is not writable: nothing can be created in {ancestor}, "
                f"where {loc.path} would go ({exc.strerror})"
            ) from None
        return
    probe = loc.child(f"_probe-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write_bytes(probe, b"")
        delete(probe)
    except StorageError as exc:
        raise StorageError(f"output location is not writable: {exc}") from None


def delete(loc: Location, *, missing_ok: bool = True) -> None:
    try:
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.Directory:
            loc.fs.delete_dir(loc.path)
        elif info.type == pafs.FileType.File:
            loc.fs.delete_file(loc.path)
        elif not missing_ok:
            raise FileNotFoundError(loc.path)
    except OSError as exc:
        raise _wrap("delete", loc, exc) from exc


def move(src: Location, dst: Location) -> None:
    """Commits ``src`` as ``dst``. Local: an atomic rename. S3: copy then delete (a single
    object becomes visible at ``dst`` only when the copy completes)."""
    try:
        dst.fs.create_dir(dst.path.rsplit("/", 1)[0], recursive=True)
        src.fs.move(src.path, dst.path)
    except OSError as exc:
        raise _wrap(f"commit {redact(src.url)} as", dst, exc) from exc


def upload_dir(local_dir: str | Path, dst: Location) -> None:
    """Copies a local directory tree to ``dst`` (replacing files with the same names)."""
    if dst.is_local:
        shutil.copytree(local_dir, dst.path, dirs_exist_ok=True)
        return
    try:
        dst.fs.create_dir(dst.path, recursive=True)
        pafs.copy_files(
            str(local_dir),
            dst.path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=dst.fs,
        )
    except OSError as exc:
        raise _wrap("upload to", dst, exc) from exc


def download_dir(src: Location, local_dir: str | Path) -> Path:
    """Copies the tree under ``src`` into ``local_dir`` and returns it."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(
            src.path,
            str(local_dir),
            source_filesystem=src.fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
    except OSError as exc:
        raise _wrap("download", src, exc) from exc
    return local_dir
