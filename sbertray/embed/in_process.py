"""Running work units in the driver's own process, for work too small to pay for Ray.

Starting a local Ray, its actors and shutting it down costs about 10 s on a laptop; a nightly
increment that copies most vectors from the earlier output, or a few thousand rows, needs a
second or two of model time. Same ``EmbedStage``, same files and commit as on the actor pool
(``ray_adapter``), one stage with a thread per core instead of one actor per core.
"""

from __future__ import annotations

from collections.abc import Callable

from sbertray.config import EmbedConfig
from sbertray.embed.encoder import EncoderSpec
from sbertray.embed.reference import embed_reference
from sbertray.embed.results import UnitResult
from sbertray.embed.reuse import DonorIndex
from sbertray.embed.shards import WorkUnit
from sbertray.embed.stage import EmbedStage


def run_units(
    config: EmbedConfig,
    units: list[WorkUnit],
    encoder: EncoderSpec,
    run_metadata: dict,
    donors: DonorIndex | None = None,
    on_result: Callable[[UnitResult], None] | None = None,
) -> list[UnitResult]:
    """Embeds ``units`` one after another; returns each unit's result, handing each to
    ``on_result`` as it is committed (progress)."""
    reference = embed_reference(config, encoder) if config.reference is not None else None
    stage = EmbedStage(config, encoder, run_metadata, reference, donors)
    results = []
    try:
        for unit in units:
            results.append(stage.process(unit))
            if on_result is not None:
                on_result(results[-1])
    finally:
        stage.close()
    return results
