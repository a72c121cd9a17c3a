"""Name-and-layout mappings, one file per family of checkpoints, each a list of `weights.rules.Rule`
plus the config translation: `molmo` (original and released Molmo), `molmo2` (transformers'
Molmo2), `clip` (base CLIP vision towers), `hf_llm` (base Qwen2 / OLMo-2 / OLMoE decoders).

A model family's mapping (`for_config`) has `PREFIX` (stripped from checkpoint keys),
`rules(cfg, tensors=None)`, `to_released(cfg, torch_dtype)` (the config.json of an export) and
`NEEDS_REMOTE_CODE` (whether loading the export in transformers needs the release's code files)."""
from __future__ import annotations


def for_config(cfg):
    """The mapping module of the config's model family: the one place the weight code dispatches."""
    from molmo_jax.models import family_of
    from molmo_jax.weights.mappings import molmo, molmo2

    return {"molmo": molmo, "molmo2": molmo2}[family_of(cfg)]
