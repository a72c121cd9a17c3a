"""Model families. Each family assembles the shared blocks of `molmo_jax.layers` into one model
class, in one file (`models/<family>.py`); everything else reaches a model through this module:

    create_model(cfg, seed)   a model with fresh parameters
    abstract_model(cfg)       the same with ShapeDtypeStructs (no memory allocated)
    count_params(model)

`cfg.family` names the family; configs written before families existed have none and are Molmo.
Every family's model has `llm` (the decoder: `embed`, `blocks`, `ln_f`, `logits`), returns
{"hidden", "logits", ...} and names the batch arrays it reads (`PROMPT_INPUTS`, `INPUTS`), which
`embed_batch` and `token_groups` turn into a prompt for `molmo_jax.generate`.
"""
from __future__ import annotations

import jax
from flax import nnx

from molmo_jax.layers import lora, quant
from molmo_jax.models.molmo import Molmo
from molmo_jax.models.molmo2 import Molmo2

FAMILIES = {"molmo": Molmo, "molmo2": Molmo2}


def family_of(cfg) -> str:
    family = cfg.get("family", "molmo")
    if family not in FAMILIES:
        raise ValueError(f"model family {family!r} is not known; choose one of {', '.join(FAMILIES)}")
    return family


def model_class(cfg) -> type[nnx.Module]:
    return FAMILIES[family_of(cfg)]


def create_model(cfg, seed: int = 0) -> nnx.Module:
    """A model with fresh parameters; with a `quant` section its LLM kernels have the quantized
    structure (int8 values, zero until loaded or quantized); with `lora.rank` > 0, adapters (and with
    `lora.base_weights="bfloat16"` the rest stored in bfloat16)."""
    model = model_class(cfg)(cfg, rngs=nnx.Rngs(seed))
    if quant.enabled(cfg):
        quant.quantize_model(model, cfg.quant, values=False)
    if not lora.enabled(cfg):
        return model
    lora.add_adapters(model, cfg.lora, seed)
    return lora.cast_base(model, "bfloat16") if cfg.lora.get("base_weights") == "bfloat16" else model


def abstract_model(cfg) -> nnx.Module:
    """The model with ShapeDtypeStructs instead of arrays: no memory is allocated."""
    return nnx.eval_shape(lambda: create_model(cfg))


def count_params(model_or_state) -> int:
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return int(sum(x.size for x in jax.tree.leaves(state)))
