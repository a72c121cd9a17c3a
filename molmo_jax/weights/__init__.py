"""Every weight format, in and out, behind two entries:

    cfg, model = weights.load(PATH)        this project's model directory, a training run (latest
                                           step) or step, an original / released PyTorch Molmo
                                           directory or a state dict file (converted in memory)
    weights.save(DIR, cfg, params)         a model directory (config.json + orbax params/)

and the streaming converters behind `python -m tools.convert`: `import_checkpoint` (PyTorch Molmo
-> model directory), `export_checkpoint` (-> released HF layout or a state dict file) and
`export_adapters` (a LoRA run's adapters -> a PEFT adapter directory) and `init_from_base` (HF CLIP + Qwen2 / OLMo-2 / OLMoE -> a Molmo for stage 1).

Inside, imports run one way, from the converters down: `locate` (what a path is), `pytorch` (Molmo
configs and tensors), `orbax_io` / `stream_orbax` (this project's format), `mappings/<family>.py`
(names and layouts as data) over `rules` (the engine), `tensors` (the one reader), `params`,
`configs`, `errors`. Every failure is a `WeightsError` naming the file, the key and the shapes.
"""
from __future__ import annotations

from molmo_jax.weights.configs import config_from_dict
from molmo_jax.weights.errors import WeightsError, read_json
from molmo_jax.weights.exporter import export_checkpoint
from molmo_jax.weights.from_base import init_from_base
from molmo_jax.weights.importer import import_checkpoint
from molmo_jax.weights.locate import CheckpointInfo, find_checkpoint
from molmo_jax.layers import lora, quant
from molmo_jax.weights.orbax_io import restore_params, save_model, shardings_by_path, stored_params
from molmo_jax.weights.peft_out import export_adapters
from molmo_jax.weights.params import flatten_params, model_from_flat, uniform_dtype
from molmo_jax.weights.pytorch import convert_tensors, open_pytorch, read_config, read_pytorch

save = save_model
__all__ = ["WeightsError", "CheckpointInfo", "find_checkpoint", "load", "load_config", "save", "save_model",
           "read_pytorch", "import_checkpoint", "export_checkpoint", "export_adapters", "init_from_base"]


def load_config(path, config=None):
    """The model config of any checkpoint `load` reads (`config`: for a bare state dict file)."""
    info = path if isinstance(path, CheckpointInfo) else find_checkpoint(path)
    if info.kind == "pytorch":
        return read_config(info, config)
    return config_from_dict(read_json(info.config_path), str(info.config_path))


def load(path, *, shardings=None, mesh=None, dtype=None, compute_dtype=None, config=None, quantize=None):
    """(cfg, model) from any checkpoint (see the module docstring). Parameters are placed by
    `shardings` (one for all, or a pytree / flat dict of them), or by the project's sharding rules on
    `mesh`; a model directory or training run is read straight into them. `dtype` casts the
    parameters, `compute_dtype` sets the model's compute dtype. PyTorch checkpoints are converted in
    memory (for the largest models, convert once with `tools.convert import`); `config` (a
    config.json or a preset name) is needed only for a bare state dict file. `quantize` ("int8", or
    "int4" / "int4:GROUP") quantizes the LLM's kernels after loading (layers.quant); a checkpoint
    saved quantized loads quantized without it."""
    import jax
    from flax import nnx

    info = find_checkpoint(path)
    if info.kind == "pytorch":
        cfg, tensors = open_pytorch(info, config)
    else:
        cfg = load_config(info)
    if mesh is not None:
        from molmo_jax import sharding
        from molmo_jax.models import abstract_model

        shardings = sharding.param_shardings(nnx.state(abstract_model(cfg), nnx.Param), mesh)
    if info.kind == "pytorch":
        flat = convert_tensors(cfg, tensors, dtype, path)
        by_path = shardings_by_path(shardings, flat)
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        flat = {p: jax.device_put(a, by_path[p] or default) for p, a in flat.items()}
    elif lora.enabled(cfg) and all(lora.is_adapter(p) for p in stored_params(info.params_dir)):
        # a run that trained adapters alone: the base comes from the checkpoint its config names
        if not cfg.lora.get("base"):
            raise WeightsError(f"{info.config_path}: adapters without a base (lora.base is empty)")
        _, base = load(cfg.lora.base, shardings=shardings, dtype=dtype)
        flat = lora.frozen_base(flatten_params(base), cfg)  # quantized or bfloat16 as it was trained
        flat |= restore_params(info.params_dir, cfg, shardings, dtype, select=lora.is_adapter)
    else:
        flat = restore_params(info.params_dir, cfg, shardings, dtype)
        cfg.param_dtype = uniform_dtype(a.dtype for a in flat.values()) or cfg.param_dtype
    if compute_dtype is not None:
        cfg.dtype = str(compute_dtype)
    model = model_from_flat(cfg, flat)
    if quantize and quantize != "float":
        if quant.enabled(cfg):
            raise WeightsError(f"{path}: already quantized ({cfg.quant.weights}); load it without --weights")
        try:
            cfg.quant = quant.parse(quantize)
            quant.quantize_model(model, cfg.quant)
        except ValueError as e:
            raise WeightsError(f"{path}: {e}") from None
    return cfg, model
