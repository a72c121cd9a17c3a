"""`export --adapters-only`: a LoRA run's adapters as a PEFT adapter directory for the released
PyTorch model (`adapter_config.json` + `adapter_model.safetensors`), which `peft.PeftModel.from_pretrained`
loads on top of the released checkpoint.

PEFT puts one adapter on one `nn.Linear`: `W + (lora_alpha / r) B A` with `lora_A.weight` [r, in] and
`lora_B.weight` [out, r]. Our adapters sit on our kernels, which the family mapping's rules turn into
the released Linears (docs/architecture.md#weight-conversion). Where one kernel is one Linear
(attention output, down projection) the adapter carries over as it is. Where the release fuses several
of our kernels into one Linear (Molmo's `att_proj` = q|k|v, `ff_proj` = up|gate), their k adapters are
one exact adapter of rank k*r on the fused Linear: the A's stacked ([k r, in]) and the B's
block-diagonal ([out, k r], each B in its own rows and columns), since the fused Linear's rows are the
kernels' outputs concatenated and all of them read the same input. Its `lora_alpha` is k*alpha, so that
PEFT's scale alpha / r is ours (`rank_pattern` / `alpha_pattern` in the config). Every exported module
is checked on layer 0: the adapter as PEFT will apply it must equal the mapping's own conversion of our
update; an adapter that no Linear expresses (e.g. on MoE expert tensors) is refused naming its path.
"""
from __future__ import annotations

import json
import re

import numpy as np

from molmo_jax.layers import lora
from molmo_jax.weights import safetensors_out
from molmo_jax.weights.configs import config_from_dict
from molmo_jax.weights.errors import WeightsError, read_json
from molmo_jax.weights.locate import find_checkpoint
from molmo_jax.weights.mappings import for_config
from molmo_jax.weights.orbax_io import restore_params, stored_params
from molmo_jax.weights.writing import Progress, Summary, atomic_output, check_destination

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _kernel_shapes(cfg) -> dict:
    from flax import nnx

    from molmo_jax.models import abstract_model

    state = nnx.state(abstract_model(cfg), nnx.Param)
    return {tuple(str(k) for k in path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def _module_name(key: str, prefix: str) -> str:
    if not key.endswith(".weight"):
        raise WeightsError(f"{key}: not the weight of a Linear; PEFT adapters cannot express it")
    return prefix + key[:-len(".weight")]


def _peft_pair(rule, layer, adapters: dict, shapes: dict, rank: int):
    """(lora_A [k r, in], lora_B [out, k r], k) of one released Linear at `layer` (None: unstacked)."""
    take = (lambda a: a) if layer is None else (lambda a: a[layer])
    targeted = [p for p in rule.paths if p[:-1] + ("lora_a",) in adapters]
    k = len(targeted)
    a = np.concatenate([take(adapters[p[:-1] + ("lora_a",)]).reshape(-1, rank).T for p in targeted])
    if len(rule.paths) == 1:
        b = take(adapters[rule.paths[0][:-1] + ("lora_b",)]).reshape(rank, -1).T
        return np.ascontiguousarray(a), np.ascontiguousarray(b), k
    # fused: each kernel's B in its own block of k*r rows ("inputs" of the kernel-shaped array that
    # the mapping turns into the Linear's rows), zeros for kernels without an adapter
    blocks = []
    for path in rule.paths:
        out_shape = shapes[path][(1 if layer is not None else 0) + 1:]
        block = np.zeros((k * rank,) + out_shape, np.float32)
        if path in targeted:
            j = targeted.index(path)
            block[j * rank:(j + 1) * rank] = take(adapters[path[:-1] + ("lora_b",)])
        blocks.append(block)
    (b,) = rule.to_torch(blocks)
    return np.ascontiguousarray(a), np.ascontiguousarray(b), k


def _check_pair(rule, layer, adapters, shapes, a, b, key):
    """The update PEFT applies (B A, unscaled) against the mapping's conversion of ours."""
    take = (lambda x: x) if layer is None else (lambda x: x[layer])
    updates = []
    for path in rule.paths:
        if path[:-1] + ("lora_a",) in adapters:
            updates.append(lora.delta(take(adapters[path[:-1] + ("lora_a",)]), take(adapters[path[:-1] + ("lora_b",)]), 0))
        else:
            updates.append(np.zeros(shapes[path][0 if layer is None else 1:], np.float32))
    (ours,) = rule.to_torch(updates)
    theirs = b.astype(np.float64) @ a.astype(np.float64)
    if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * (np.abs(ours).max() + 1e-30)):
        raise WeightsError(f"{key}: the adapters of {', '.join('.'.join(p) for p in rule.paths)} do not convert to "
                           "one PEFT adapter on this Linear; export the merged model instead (without --adapters-only)")


def export_adapters(src, dst, *, dtype=None, overwrite=False, progress=None) -> Summary:
    """Write the adapters of the LoRA run `src` to the PEFT directory `dst` (see the module doc)."""
    dst = check_destination(dst, overwrite)
    info = find_checkpoint(src)
    if info.kind == "pytorch":
        raise WeightsError(f"{src}: a PyTorch checkpoint; --adapters-only takes a molmo_jax LoRA run")
    cfg = config_from_dict(read_json(info.config_path), str(info.config_path))
    if not lora.enabled(cfg):
        raise WeightsError(f"{src}: has no adapters (lora.rank is 0); --adapters-only exports a LoRA run's adapters, "
                           "export the model without it")
    rank, alpha = int(cfg.lora.rank), float(cfg.lora.alpha)
    only_adapters = all(lora.is_adapter(p) for p in stored_params(info.params_dir))  # a run's checkpoint
    adapters = {p: np.asarray(v, np.float32) for p, v in restore_params(
        info.params_dir, cfg, select=lora.is_adapter if only_adapters else None).items() if lora.is_adapter(p)}
    mapping = for_config(cfg)
    shapes = _kernel_shapes(cfg)
    covered, plans = set(), []
    for rule in mapping.rules(cfg):
        if not any(p[-1] == "kernel" and p[:-1] + ("lora_a",) in adapters for p in rule.paths):
            continue  # no adapter here (a bias rule shares its module's path, not its kernel)
        if any(p[-1] != "kernel" for p in rule.paths):
            raise WeightsError(f"{rule.torch_keys[0]}: adapters on {'.'.join(rule.paths[0][:-1])}, which the released "
                               "layout stores with other tensors in one; export the merged model instead (without "
                               "--adapters-only)")
        covered.update(p[:-1] for p in rule.paths)
        plans.append(rule)
    missing = sorted(".".join(p[:-1]) for p in adapters if p[-1] == "lora_a" and p[:-1] not in covered)
    if missing:
        raise WeightsError(f"adapters on {missing[0]} have no Linear in the released layout; export the merged "
                           "model instead (without --adapters-only)")

    out_dtype = np.dtype(dtype or "float32")
    tensors, patterns, rank_pattern, alpha_pattern = [], [], {}, {}
    for rule in plans:
        (key,) = rule.torch_keys
        layers = [None] if rule.n_layers is None else list(range(rule.n_layers))
        module = _module_name(key, mapping.PREFIX)
        pattern = re.escape(module).replace(re.escape("{i}"), r"\d+")
        patterns.append(pattern)
        for layer in layers:
            a, b, k = _peft_pair(rule, layer, adapters, shapes, rank)
            name = module.format(i=layer)
            if layer in (None, 0):
                _check_pair(rule, layer, adapters, shapes, a, b, name)
            tensors += [(f"{PEFT_PREFIX}{name}.lora_A.weight", a.astype(out_dtype)),
                        (f"{PEFT_PREFIX}{name}.lora_B.weight", b.astype(out_dtype))]
        if k > 1:
            rank_pattern[pattern], alpha_pattern[pattern] = k * rank, k * alpha
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": cfg.lora.get("base") or None,
        "r": rank, "lora_alpha": alpha, "target_modules": "(" + "|".join(patterns) + ")",
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }
    entries = [(k, a.shape, a.dtype) for k, a in tensors]
    summary = Summary("export --adapters-only", str(src), str(dst), cfg.name, n_tensors=len(entries),
                      dtype=out_dtype.name, n_params=sum(a.size for _, a in tensors), files=1)
    summary.notes.append(f"PEFT LoRA r={rank}, lora_alpha={alpha:g}" + (
        f"; fused Linears at rank k*r: {', '.join(f'{p} r={r}' for p, r in rank_pattern.items())}" if rank_pattern else ""))
    if cfg.lora.get("base_weights", "keep") != "keep":
        summary.notes.append(f"trained on a {cfg.lora.base_weights} base; PEFT applies them to the float base")
    count = Progress(summary, progress, sum(a.nbytes for _, a in tensors))
    with atomic_output(dst, overwrite) as tmp:
        tmp.mkdir()
        with safetensors_out.ShardWriter(tmp, [entries], [ADAPTER_WEIGHTS], {"format": "pt"}) as writer:
            for k, a in tensors:
                writer.write(k, a)
                count(k, a.nbytes)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return summary.finish()
