"""Typed configs for every job, loaded from YAML with ``key.path=value`` overrides.

Recipes are data: each YAML file in ``jobs/configs/`` loads into one of these models
(``train``: fine-tuning; ``embed``: batch embedding and the nightly pipeline; ``core``: what they
share). Unknown keys are errors that name the key, and ``${VAR}`` / ``${VAR:-default}`` pull
secrets and endpoints from the environment.
"""

from sbertray.config.core import (
    DEFAULT_BASE_MODEL,
    ConfigError,
    StorageConfig,
    apply_overrides,
    dump_without,
    load_config,
    parse_config,
    stable_hash,
)
from sbertray.config.embed import (
    BadInputConfig,
    ComputeConfig,
    ConfigRef,
    EmbedConfig,
    EmbedInputConfig,
    EmbedOutputConfig,
    IndexConfig,
    NightlyConfig,
    PromotionConfig,
    ReferenceConfig,
)
from sbertray.config.train import (
    PairColumns,
    PairDataConfig,
    ScalingConfigSpec,
    TrainConfig,
    TrainingConfig,
    TrainOutputConfig,
)
from sbertray.config.tune import Range, SearchSpace, TuneSpec

__all__ = [
    "DEFAULT_BASE_MODEL",
    "BadInputConfig",
    "ComputeConfig",
    "ConfigError",
    "ConfigRef",
    "EmbedConfig",
    "EmbedInputConfig",
    "EmbedOutputConfig",
    "IndexConfig",
    "NightlyConfig",
    "PairColumns",
    "PairDataConfig",
    "PromotionConfig",
    "Range",
    "ReferenceConfig",
    "ScalingConfigSpec",
    "SearchSpace",
    "StorageConfig",
    "TrainConfig",
    "TrainOutputConfig",
    "TrainingConfig",
    "TuneSpec",
    "apply_overrides",
    "dump_without",
    "load_config",
    "parse_config",
    "stable_hash",
]
