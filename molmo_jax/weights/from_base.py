"""`init-from-base`: a Hugging Face CLIP vision tower + a Qwen2 / OLMo-2 / OLMoE causal LM -> a Molmo
checkpoint as the original builds it before stage 1 (docs/architecture.md#initialisation): the CLIP
tower minus its last layer, the base LLM, a fresh connector (pooling and projector weights
N(0, 0.02), biases and `pad_embed` zero) and `additional_vocab_size` fresh embedding rows N(0, 0.02).

Both checkpoints are checked against their mappings (`mappings/clip.py`, `mappings/hf_llm.py`) from
their headers before anything is written, then streamed layer by layer like `import`.
"""
from __future__ import annotations

import pathlib

import numpy as np
from flax import nnx

from molmo_jax import config as config_lib
from molmo_jax.weights.errors import WeightsError, read_json
from molmo_jax.weights.importer import plan_leaves, write_model_dir
from molmo_jax.weights.locate import CONFIG
from molmo_jax.weights.mappings import clip as clip_mapping
from molmo_jax.weights.mappings import hf_llm as llm_mapping
from molmo_jax.weights.params import check_param_shapes, flatten_params
from molmo_jax.weights.pytorch import checked_reader
from molmo_jax.weights.rules import check_tensors, output_dtype
from molmo_jax.weights.stream_orbax import Group, StreamedLeaf
from molmo_jax.weights.tensors import open_tensors
from molmo_jax.weights.writing import Summary, check_destination


def build_config(clip: dict, llm: dict, *, name, vit_layers=(-2, -9), vit_keep=None, vocab_size=None,
                 additional_vocab_size=128, max_sequence_length=4096):
    vit_values = clip_mapping.vit_config_from_clip(clip, n_layers_kept=vit_keep)
    llm_values = llm_mapping.llm_config_from_hf(llm)
    if vocab_size is not None:
        if not 0 < vocab_size <= llm_values["embedding_size"]:
            raise WeightsError(f"--vocab-size {vocab_size} must be in 1..{llm_values['embedding_size']} "
                               "(the base model's embedding rows)")
        llm_values["vocab_size"] = vocab_size
    cfg = config_lib.model_config(
        name, config_lib.llm_config(**llm_values, additional_vocab_size=additional_vocab_size,
                                    max_sequence_length=max_sequence_length),
        vit=config_lib.vit_config(**vit_values, vit_layers=tuple(vit_layers)))
    try:
        config_lib.resolved_vit_layers(cfg)
    except ValueError as e:
        raise WeightsError(f"--vit-layers: {e}") from None
    return cfg


def fresh_parameters(cfg, seed) -> dict:
    """The connector (its pad embeddings zero) and the new embedding rows, {path: array}."""
    from molmo_jax.models.molmo import Connector

    params = flatten_params(nnx.state(Connector(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
    out = {("connector",) + p: np.asarray(v) for p, v in params.items()}
    if ("connector", "pad_embed") in out:  # the padding embeddings start at zero
        out[("connector", "pad_embed")] = np.zeros_like(out[("connector", "pad_embed")])
    if cfg.llm.additional_vocab_size:
        rng = np.random.default_rng(seed)
        shape = (cfg.llm.additional_vocab_size, cfg.llm.d_model)
        out[("llm", "new_embedding")] = 0.02 * rng.standard_normal(shape, np.float32)
    return out


def init_from_base(vit_dir, llm_dir, dst, *, vit_layers=(-2, -9), vit_keep=None, vocab_size=None,
                   additional_vocab_size=128, max_sequence_length=4096, dtype=None, seed=0, name=None,
                   tokenizer=None, overwrite=False, progress=None) -> Summary:
    dst = check_destination(dst, overwrite)
    vit_dir, llm_dir = pathlib.Path(vit_dir), pathlib.Path(llm_dir)
    llm_json = read_json(llm_dir / CONFIG)
    cfg = build_config(read_json(vit_dir / CONFIG), llm_json, name=name or dst.name, vit_layers=vit_layers,
                       vit_keep=vit_keep, vocab_size=vocab_size, additional_vocab_size=additional_vocab_size,
                       max_sequence_length=max_sequence_length)
    clip = open_tensors(vit_dir, prefix=clip_mapping.PREFIX)
    llm = open_tensors(llm_dir)
    clip_rules = clip_mapping.rules(cfg)
    llm_rules = llm_mapping.rules(cfg, llm.keys(), tie_word_embeddings=bool(llm_json.get("tie_word_embeddings")))
    # Validation from headers only: every name, shape and dtype, before anything is written.
    check_tensors(clip_rules, cfg, clip, ignore=clip_mapping.ignore(cfg.vit.n_layers), where=f"{vit_dir} (CLIP)")
    llm_dtype = check_tensors(llm_rules, cfg, llm, ignore=llm_mapping.ignore, where=f"{llm_dir} (LLM)")
    cfg.param_dtype = output_dtype(dtype) if dtype else llm_dtype
    fresh = fresh_parameters(cfg, seed)
    leaves = (plan_leaves(cfg, clip_rules, checked_reader(clip), cfg.param_dtype)
              + plan_leaves(cfg, llm_rules, checked_reader(llm), cfg.param_dtype))
    group = Group(lambda _: fresh)
    leaves += [StreamedLeaf(p, a.shape, np.dtype(cfg.param_dtype), group) for p, a in fresh.items()]
    check_param_shapes(cfg, {leaf.path: leaf.shape for leaf in leaves}, "init-from-base")
    summary = Summary("init-from-base", f"{vit_dir} + {llm_dir}", str(dst), cfg.name, n_tensors=len(leaves),
                      n_params=sum(leaf.size for leaf in leaves), dtype=cfg.param_dtype, files=1)
    write_model_dir(dst, cfg, leaves, summary, tokenizer=tokenizer, fallback_tokenizer=llm_dir, progress=progress,
                    overwrite=overwrite)
    summary.notes.append(f"fresh connector and {cfg.llm.additional_vocab_size} new embedding rows, seed {seed}")
    return summary.finish()
