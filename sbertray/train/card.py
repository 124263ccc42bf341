"""The model card of a trained model: sentence-transformers writes it on the worker; sbertray
names the base model and adds how the model was produced."""

from __future__ import annotations

import os
import shlex
import sys

from sbertray import storage
from sbertray.config import DEFAULT_BASE_MODEL
from sbertray.modeling import bundled_model_path, resolve_model_path
from sbertray.report import dev_scores_line


def card_base_model(name: str) -> str | None:
    if name == DEFAULT_BASE_MODEL or resolve_model_path(name) == bundled_model_path():
        return DEFAULT_BASE_MODEL
    return name if not storage.is_url(name) and not os.path.exists(name) else None


def add_run_to_card(model: storage.Location, summary: dict, command: str | None = None) -> None:
    """Adds how this model was produced (command, workers, wall time, dev score) to its card,
    just before sentence-transformers' "Framework Versions" section."""
    card_loc = model.child("README.md")
    card = storage.read_bytes(card_loc).decode()
    dev = summary.get("dev_metrics")
    lines = [
        "### Trained with sbertray",
        f"- Command: `{command or shlex.join(['sbertray', *map(storage.redact_arg, sys.argv[1:])])}`",
        f"- Ray Train workers: {summary['num_workers']}; steps: {summary['global_step']}"
        + (
            f" (resumed from step {summary['resumed_from_step']})"
            if summary["resumed_from_step"]
            else ""
        ),
        f"- Wall time: {summary['wall_time_s']:.0f} s",
    ]
    if dev:
        lines.append(f"- {dev_scores_line(dev)}")
    if rotation := summary.get("rotation"):
        lines.append(
            f"- Matryoshka rotation (the `Dense` layer): fitted to {rotation['rows']:,} training "
            "examples; orthogonal, so the full-width cosines are the trained encoder's"
        )
    block = "\n".join(lines) + "\n\n"
    marker = "### Framework Versions"
    card = card.replace(marker, block + marker, 1) if marker in card else card + "\n" + block
    storage.write_bytes(card_loc, card.encode())
