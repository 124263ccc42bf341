"""What every config shares: the strict base model, storage settings, errors that name the file
and key, and loading YAML with ``key.path=value`` overrides and ``${VAR}`` references."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sbertray.errors import UserError

DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the file and the key."""


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Strict):
    """How to reach object storage. Credentials come from the AWS environment variables /
    credential chain, or from ``${VAR}`` references in ``endpoint_url``
    (``https://${KEY}:${SECRET}@host``); sbertray never writes or prints them."""

    endpoint_url: str | None = None  # S3-compatible endpoint; default: $AWS_ENDPOINT_URL
    region: str | None = None  # default: $AWS_REGION, then us-east-1
    anonymous: bool = False  # public buckets
    # Tries per S3 request, with backoff (5 ride out ~8 s of outage); 1 fails at the first error.
    max_attempts: int = Field(5, ge=1)
    # Local folders every node of the cluster sees (an NFS / EFS / FSx mount): on a cluster
    # of more than one node, outputs may be local paths only under these.
    shared_paths: list[str] = Field(default_factory=list)


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _expand_env(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"`{where}` references ${{{name}}}, which is not set in the environment")

    return _ENV_RE.sub(sub, value)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies ``a.b.c=value`` overrides; values are parsed as YAML (``3``, ``true``, ``[1]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override `{item}` must look like `key.path=value`")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override `{key}`: `{part}` is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def _format_errors(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            known = _known_keys(model, err["loc"][:-1])
            hint = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            lines.append(f"unknown key `{loc}`" + (f" (did you mean `{hint[0]}`?)" if hint else ""))
        elif err["type"] == "missing":
            lines.append(f"missing required key `{loc}`")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"`{loc}`: {err['msg']}{shown}" if loc else err["msg"])
    return f"{source}: invalid config:\n  " + "\n  ".join(lines)


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)]
        sub = next((a for a in candidates if issubclass(a, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def parse_config(model: type[ConfigT], data: dict, *, source: str = "config") -> ConfigT:
    try:
        return model.model_validate(_expand_env(data, ""))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, model, source)) from None


def dump_without(config: BaseModel, excluded: dict[str, set[str] | None]) -> dict:
    """``config`` as a dict without the ``excluded`` keys: a whole section (None) or some keys
    of it. Hashes of "what changes the result" exclude the few keys known not to, so a new key
    counts by default."""
    data = config.model_dump()
    for section, keys in excluded.items():
        if keys is None:
            data.pop(section, None)
        else:
            for key in keys:
                data[section].pop(key, None)
    return data


def load_config(
    model: type[ConfigT], path: str | Path, overrides: list[str] | None = None
) -> ConfigT:
    """Reads a YAML config into ``model``. Relative local paths in it stay relative to the
    current directory (recipes in this repo are written relative to the repo root)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return parse_config(model, apply_overrides(data, overrides or []), source=str(path))


def stable_hash(value) -> str:
    """A hash of a JSON-able value, independent of key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
