"""This project's own config.json: a model ConfigDict as JSON and back."""
from __future__ import annotations

import json

from ml_collections import ConfigDict

from molmo_jax.models import FAMILIES
from molmo_jax.weights.errors import WeightsError


def config_to_json(cfg) -> str:
    try:
        return json.dumps(cfg.to_dict(), indent=1)
    except TypeError as e:
        raise WeightsError(f"config has a value JSON cannot hold: {e}") from None


def tuples(value):
    """JSON lists back to the tuples configs hold, recursively."""
    if isinstance(value, dict):
        return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(tuples(v) for v in value)
    return value


def is_model_config(d: dict) -> bool:
    """A molmo_jax model config, or a training run's config whose `model` part is one."""
    return "llm" in d or (isinstance(d.get("model"), dict) and "llm" in d["model"])


def config_from_dict(d: dict, source="config") -> ConfigDict:
    """A model ConfigDict from its JSON form; a run config's `model` part is accepted too."""
    if "llm" not in d and isinstance(d.get("model"), dict) and "llm" in d["model"]:
        d = d["model"]
    if "llm" not in d:
        raise WeightsError(f"{source}: not a molmo_jax model config (no 'llm' section)")
    family = d.get("family", "molmo")
    if family not in FAMILIES:
        raise WeightsError(f"{source}: model family {family!r} is not known; choose one of {', '.join(FAMILIES)}")
    return ConfigDict(tuples(d))
