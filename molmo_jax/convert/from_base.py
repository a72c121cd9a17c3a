"""`init-from-base`: a Hugging Face CLIP vision tower + a Qwen2 / OLMo-2 / OLMoE causal LM -> a Molmo
checkpoint as the original builds it before stage 1 (spec 12.2, 13.1): the CLIP tower minus its last
layer, the base LLM, a fresh connector (pooling and projector weights N(0, 0.02), biases and
`pad_embed` zero) and `additional_vocab_size` fresh embedding rows N(0, 0.02).

The key mapping is molmo_jax.hf_base's. To stream the LLM, hf_base runs on a one-layer view of the
checkpoint per layer (layer i renamed to layer 0). The tensors a view does not need are zero-byte
stand-ins of the right shape (numpy's empty structured dtype): hf_base checks their names and
shapes as usual, and no data is read or copied for them. The same stand-ins let the whole
checkpoint be validated before anything is written.
"""
from __future__ import annotations

import pathlib
import re

import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from molmo_jax import config as config_lib
from molmo_jax import hf_base, torch_format
from molmo_jax.checkpoint import (CONFIG, PARAMS, TOKENIZER, flatten_params, atomic_output, check_destination,
                                  check_param_shapes, config_to_json)
from molmo_jax.convert import common, sources, validate
from molmo_jax.convert.stream_orbax import Group, StreamedLeaf, write_params
from molmo_jax.torch_format import WeightsError

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
STAND_IN = np.dtype([])  # zero bytes per element


class _Lazy:
    """A source tensor, read (and checked) only when numpy asks for its values."""

    def __init__(self, tensors, key):
        self.tensors, self.key = tensors, key
        self.shape = tensors.info(key).shape

    def __array__(self, dtype=None, copy=None):
        info = self.tensors.info(self.key)
        where = f"{info.file}: tensor {self.key!r}"
        if info.dtype.name not in validate.FLOAT_DTYPES:
            raise WeightsError(f"{where} {info.shape} has dtype {info.dtype.name}, not a floating-point type")
        a = self.tensors.read(self.key)
        validate.check_finite(a, where)
        return a if dtype is None else a.astype(dtype)


def _value(tensors, key, real):
    return _Lazy(tensors, key) if real else np.zeros(tensors.info(key).shape, STAND_IN)


def _llm_view(tensors, i, real_layer, real_globals) -> dict:
    view = {}
    for key in tensors.keys():
        m = LAYER_KEY.match(key)
        if m is None:
            view[key] = _value(tensors, key, real_globals)
        elif int(m.group(1)) == i:
            view[f"model.layers.0.{m.group(2)}"] = _value(tensors, key, real_layer)
    return view


def _llm_layer(tensors, one_layer_cfg, i, tie, real_layer=True, real_globals=False) -> dict:
    try:
        return hf_base.llm_from_hf(_llm_view(tensors, i, real_layer, real_globals), one_layer_cfg,
                                   tie_word_embeddings=tie)
    except WeightsError as e:  # name the real layer, not the view's layer 0
        raise WeightsError(str(e).replace("model.layers.0.", f"model.layers.{i}.")) from None


def _is_block(path):
    return path[:2] == ("llm", "blocks")


def build_config(clip: dict, llm: dict, *, name, vit_layers=(-2, -9), vit_keep=None, vocab_size=None,
                 additional_vocab_size=128, max_sequence_length=4096):
    vit_values = hf_base.vit_config_from_clip(clip, n_layers_kept=vit_keep)
    llm_values = hf_base.llm_config_from_hf(llm)
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


def _fresh_connector(cfg, seed) -> dict:
    from molmo_jax.models.molmo import Connector

    params = flatten_params(nnx.state(Connector(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
    out = {("connector",) + p: np.asarray(v) for p, v in params.items()}
    if ("connector", "pad_embed") in out:  # spec 13.1: the padding embeddings start at zero
        out[("connector", "pad_embed")] = np.zeros_like(out[("connector", "pad_embed")])
    return out


def init_from_base(vit_dir, llm_dir, dst, *, vit_layers=(-2, -9), vit_keep=None, vocab_size=None,
                   additional_vocab_size=128, max_sequence_length=4096, dtype=None, seed=0, name=None,
                   tokenizer=None, overwrite=False, progress=None) -> common.Summary:
    dst = check_destination(dst, overwrite)
    vit_dir, llm_dir = pathlib.Path(vit_dir), pathlib.Path(llm_dir)
    llm_json = torch_format.load_json(llm_dir / CONFIG)
    cfg = build_config(torch_format.load_json(vit_dir / CONFIG), llm_json, name=name or dst.name,
                       vit_layers=vit_layers, vit_keep=vit_keep, vocab_size=vocab_size,
                       additional_vocab_size=additional_vocab_size, max_sequence_length=max_sequence_length)
    clip, llm = sources.open_tensors(vit_dir, prefix=""), sources.open_tensors(llm_dir, prefix="")
    float_dtypes = [llm.info(k).dtype for k in llm.keys() if llm.info(k).dtype.name in validate.FLOAT_DTYPES]
    cfg.param_dtype = validate.output_dtype(dtype or common_dtype(float_dtypes))
    tie = bool(llm_json.get("tie_word_embeddings"))
    one_layer = ConfigDict(cfg.to_dict())
    one_layer.llm.n_layers = 1

    # Validation from headers only: every name and shape, before anything is written.
    layers = {int(m.group(1)) for m in map(LAYER_KEY.match, llm.keys()) if m}
    extra = sorted(layers - set(range(cfg.llm.n_layers)))
    if extra:
        raise WeightsError(f"{llm_dir}: unexpected keys model.layers.{extra[0]}.* (the config has "
                           f"{cfg.llm.n_layers} layers)")
    shapes = {p: a.shape for p, a in hf_base.vit_from_clip(
        {k: _value(clip, k, False) for k in clip.keys()}, cfg).items()}
    for i in range(cfg.llm.n_layers):
        for p, a in _llm_layer(llm, one_layer, i, tie, real_layer=False).items():
            shapes[p] = (cfg.llm.n_layers,) + a.shape[1:] if _is_block(p) else a.shape
    connector = _fresh_connector(cfg, seed)
    shapes.update({p: a.shape for p, a in connector.items()})
    if cfg.llm.additional_vocab_size:
        shapes[("llm", "new_embedding")] = (cfg.llm.additional_vocab_size, cfg.llm.d_model)
    check_param_shapes(cfg, shapes, "init-from-base")

    def new_embedding(_):
        rng = np.random.default_rng(seed)
        return {("llm", "new_embedding"): 0.02 * rng.standard_normal(shapes[("llm", "new_embedding")], np.float32)}

    groups = {
        "vit": Group(lambda _: hf_base.vit_from_clip({k: _Lazy(clip, k) for k in clip.keys()}, cfg)),
        "connector": Group(lambda _: connector),
        "llm": Group(lambda _: {p: a for p, a in _llm_layer(llm, one_layer, 0, tie, False, True).items()
                                if not _is_block(p)}),
        "blocks": Group(lambda i: {p: a[0] for p, a in _llm_layer(llm, one_layer, i, tie).items() if _is_block(p)},
                        cfg.llm.n_layers),
        "new_embedding": Group(new_embedding),
    }

    def group_of(path):
        if path == ("llm", "new_embedding"):
            return groups["new_embedding"]
        return groups["blocks" if _is_block(path) else {"vision": "vit"}.get(path[0], path[0])]

    leaves = [StreamedLeaf(p, s, np.dtype(cfg.param_dtype), group_of(p)) for p, s in shapes.items()]
    summary = common.Summary("init-from-base", f"{vit_dir} + {llm_dir}", str(dst), cfg.name, n_tensors=len(leaves),
                             n_params=sum(leaf.size for leaf in leaves), dtype=cfg.param_dtype, files=1)
    with atomic_output(dst, overwrite) as tmp:
        tmp.mkdir()
        (tmp / CONFIG).write_text(config_to_json(cfg))
        write_params(tmp / PARAMS, leaves, common.Progress(summary, progress, sum(leaf.nbytes for leaf in leaves)))
        if tokenizer is not None:
            common.copy_tokenizer(tokenizer, tmp / TOKENIZER)
        elif common.copy_tokenizer(llm_dir, tmp / TOKENIZER, required=False):
            summary.notes.append(f"tokenizer files copied from {llm_dir} (the base tokenizer)")
    summary.notes.append(f"fresh connector and {cfg.llm.additional_vocab_size} new embedding rows, seed {seed}")
    return summary.finish()


def common_dtype(dtypes) -> str:
    names = {np.dtype(d).name for d in dtypes}
    return names.pop() if len(names) == 1 and next(iter(names)) in validate.OUTPUT_DTYPES else "float32"
