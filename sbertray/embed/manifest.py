"""The run record written at the end of every embed run: ``_manifest.json`` then ``_SUCCESS``.

The manifest is the source of truth for what is done: incremental runs read it (from the output
location, not local disk) to skip input files whose fingerprint and outputs are already
committed.
"""

from __future__ import annotations

import hashlib
import json

from sbertray import storage

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
MANIFEST_VERSION = 1


def config_hash(config_dict: dict) -> str:
    return hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()


def write(out: storage.Location, manifest: dict) -> None:
    """Writes the manifest, then ``_SUCCESS``: a reader that sees ``_SUCCESS`` sees a complete
    manifest and every output file it lists."""
    storage.write_bytes(out.child(MANIFEST), json.dumps(manifest, indent=2, default=str).encode())
    storage.write_bytes(out.child(SUCCESS), b"")


def read(out: storage.Location) -> dict | None:
    """The last committed manifest under ``out``, or None if there is none."""
    loc = out.child(MANIFEST)
    if not storage.exists(loc):
        return None
    return json.loads(storage.read_bytes(loc))
