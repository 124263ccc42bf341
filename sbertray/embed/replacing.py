"""An existing output is rewritten only on purpose: a run whose settings would give its rows
other vectors or columns than the committed ones (another model, dtype, truncation, pair or
reference mode, text column, backend, ...) is refused with the settings that differ, unless
``output.mode: replace`` (``--replace``). A new input location is not such a change: units are
matched by their files' relative paths and fingerprints."""

from __future__ import annotations

from sbertray import storage
from sbertray.config import EmbedOutputConfig
from sbertray.embed.commit import MANIFEST, NOT_IN_CONTENT
from sbertray.errors import UserError
from sbertray.output_paths import LANCE_PARTS_DIR


class SettingsChangedError(UserError, ValueError):
    """The output holds rows written with other settings, and replacing them was not asked."""


# Besides the keys that never change an output file's bytes: where the input is read from.
_NOT_COMPARED = {**NOT_IN_CONTENT, "input": {"path"}}


def changed_settings(last: dict, run_metadata: dict) -> list[tuple[str, object, object]]:
    """``(key, committed value, this run's value)`` for each setting that differs between the
    output's last manifest and this run."""
    changes = []
    if last["model"]["model_hash"] != run_metadata["model_hash"]:
        changes.append(("model", last["model"]["model"], run_metadata["model"]))
    old, new = _compared(last["config"]), _compared(run_metadata["config"])
    # Keys both know: a key added by a newer sbertray is not a change the user made.
    for key in sorted(old.keys() & new.keys()):
        if old.get(key) != new.get(key):
            changes.append((key, old.get(key), new.get(key)))
    return changes


def _compared(config: dict) -> dict[str, object]:
    """The config's settings as flat ``section.key`` entries, without ``_NOT_COMPARED``."""
    flat = {}
    for section, value in config.items():
        skipped = _NOT_COMPARED.get(section, set())
        if skipped is None:
            continue
        if isinstance(value, dict):
            flat |= {f"{section}.{k}": v for k, v in value.items() if k not in skipped}
        else:
            flat[section] = value
    return flat


def check_unchanged(last: dict | None, run_metadata: dict, output_url: str) -> None:
    """Refuses to rewrite ``output_url``'s rows with other settings unless asked to."""
    if last is None or run_metadata["config"]["output"]["mode"] == "replace":
        return
    changes = changed_settings(last, run_metadata)
    if changes:
        listed = "; ".join(f"`{key}`: {old!r} -> {new!r}" for key, old, new in changes)
        raise SettingsChangedError(
            f"{output_url} holds rows written with other settings ({listed}): this run would "
            "rewrite all of them. Write to a new `output.path`, or rewrite it on purpose with "
            "`--replace` (`output.mode: replace` in a config)"
        )


def check_format(root: storage.Location, output: EmbedOutputConfig) -> None:
    """Refuses to write one format where an output of the other is committed (``--replace``
    would leave the other's files behind: it rewrites rows, not layouts)."""
    other, manifest = ("Parquet", root.child(MANIFEST))
    if output.format == "parquet":
        other, manifest = ("Lance", root.child(LANCE_PARTS_DIR, MANIFEST))
    if storage.exists(manifest):
        raise SettingsChangedError(
            f"{storage.redact(root.url)} holds a {other} output, and this run writes "
            f"`output.format: {output.format}`: write it to a new `output.path`"
        )
