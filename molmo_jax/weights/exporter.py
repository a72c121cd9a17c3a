"""`export`: one of this project's checkpoints (model directory or training run) -> the released
Hugging Face layout of its family (Molmo: the remote-code release; Molmo2: transformers'
Molmo2ForConditionalGeneration), or one state dict file.

Output (format "hf"): `config.json` in the released format plus the `"molmo_jax"` extras,
`model-0000k-of-0000n.safetensors` shards of at most `shard_size` bytes of tensor data, and
`model.safetensors.index.json` (metadata.total_size, weight_map); keys are the family mapping's
(Molmo: `model.<original key>`). Format "state_dict": one safetensors file with the same keys, the
molmo_jax config in its header.

Everything is planned from metadata before writing (keys, shapes, dtypes, shard boundaries); then
each mapping rule runs layer by layer, reading only that layer's slice of the stacked orbax leaves,
and its tensors are appended to the shard being written.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np

from molmo_jax.layers import lora
from molmo_jax.weights.configs import config_from_dict, config_to_json
from molmo_jax.weights.errors import WeightsError, read_json
from molmo_jax.weights.locate import CONFIG, TOKENIZER, find_checkpoint
from molmo_jax.weights.mappings import for_config
from molmo_jax.weights.orbax_io import check_stored_params
from molmo_jax.weights.params import uniform_dtype
from molmo_jax.weights.pytorch import CONFIG_METADATA_KEY
from molmo_jax.weights.rules import check_finite, output_dtype, torch_shapes
from molmo_jax.weights import safetensors_out
from molmo_jax.weights.stream_orbax import ParamReader
from molmo_jax.weights.writing import Progress, Summary, atomic_output, check_destination, copy_tokenizer

FORMATS = ("hf", "state_dict")
REMOTE_CODE_FILES = ("*.py", "preprocessor_config.json", "processor_config.json", "generation_config.json")


class FlatReader:
    """ParamReader's interface over parameters in memory ({path: array})."""

    def __init__(self, flat: dict):
        self.flat = {p: np.asarray(a) for p, a in flat.items()}
        self.leaves = {p: (a.shape, a.dtype) for p, a in self.flat.items()}

    def read(self, path, index: int | None = None) -> np.ndarray:
        a = self.flat[path]
        return a if index is None else a[index]


def conversion_units(rules) -> list[tuple]:
    """(rule, layer) pairs in output order: unstacked tensors first, then each layer stack (the
    decoder's, the ViT's) layer by layer."""
    units = [(r, None) for r in rules if r.n_layers is None]
    stacks: dict[str, list] = {}
    for r in rules:
        if r.n_layers is not None:
            stacks.setdefault(r.paths[0][0], []).append(r)
    for stack in stacks.values():
        units += [(r, i) for i in range(stack[0].n_layers) for r in stack]
    return units


def export_checkpoint(src, dst, *, dtype=None, fmt="hf", tokenizer=None, shard_size="5GB", remote_code=None,
                      overwrite=False, progress=None) -> Summary:
    """Export the checkpoint `src` to `dst` (a directory for "hf", a .safetensors file for
    "state_dict"). `dtype`: cast (default: each parameter's stored dtype). `tokenizer`: a directory
    whose tokenizer files are copied (default: `src`'s tokenizer/ if any). `remote_code`: a released
    checkpoint directory whose code and processor files (*.py, preprocessor_config.json, ...) are copied."""
    if fmt not in FORMATS:
        raise WeightsError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    dst = check_destination(dst, overwrite)
    if fmt == "state_dict" and dst.suffix != ".safetensors":
        raise WeightsError(f"{dst}: a state_dict export is one file; give it a .safetensors name")
    max_bytes = safetensors_out.parse_size(shard_size)
    info = find_checkpoint(src)
    if info.kind == "pytorch":
        raise WeightsError(f"{src}: already a PyTorch checkpoint; export takes a molmo_jax checkpoint")
    cfg = config_from_dict(read_json(info.config_path), str(info.config_path))
    if lora.enabled(cfg):  # adapters: merged into their base, in memory, and exported as one model
        from molmo_jax.weights import load
        from molmo_jax.weights.params import flatten_params

        reader = FlatReader(lora.merge(flatten_params(load(src)[1]), cfg))
        cfg = config_from_dict(cfg.to_dict())
        del cfg["lora"]
    else:
        reader = ParamReader(info.params_dir)
    check_stored_params(cfg, reader.leaves, info.params_dir)
    out_dtype = {p: output_dtype(dtype) if dtype else np.dtype(d).name for p, (_, d) in reader.leaves.items()}

    mapping = for_config(cfg)
    problem = getattr(mapping, "remote_code_problem", lambda cfg: None)(cfg) if fmt == "hf" else None
    if problem and remote_code is not None:
        raise WeightsError(f"--remote-code: the released code cannot load {cfg.name} ({problem}); export "
                           "without --remote-code and load the export with molmo_jax")
    rules, prefix = mapping.rules(cfg), mapping.PREFIX
    shapes = torch_shapes(rules, cfg)
    units = conversion_units(rules)
    entries = [(prefix + key, shapes[key], out_dtype[rule.paths[0]]) for rule, i in units for key in rule.keys(i)]
    torch_dtype = uniform_dtype(out_dtype.values()) or "float32"
    if fmt == "hf":
        shards = safetensors_out.plan_shards(entries, max_bytes)
        names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        metadata = {"format": "pt"}
    else:
        shards, names = [entries], None
        exported = config_from_dict(cfg.to_dict())
        exported.param_dtype = torch_dtype
        metadata = {"format": "pt", CONFIG_METADATA_KEY: config_to_json(exported)}

    summary = Summary("export", str(src), str(dst), cfg.name, n_tensors=len(entries), dtype=torch_dtype,
                      n_params=sum(int(np.prod(s)) for s, _ in reader.leaves.values()), files=len(shards))
    if info.step is not None:
        summary.notes.append(f"training checkpoint, step {info.step}")
    count = Progress(summary, progress, sum(safetensors_out.nbytes(s, d) for _, s, d in entries))
    with atomic_output(dst, overwrite) as tmp:
        if fmt == "hf":
            tmp.mkdir()
            directory = tmp
        else:  # the temporary is the file itself
            directory, names = tmp.parent, [tmp.name]
        with safetensors_out.ShardWriter(directory, shards, names, metadata) as writer:
            for rule, i in units:
                arrays = []
                for path in rule.paths:
                    a = reader.read(path, i)
                    check_finite(a, f"{info.params_dir}: parameter {'.'.join(path)}" + ("" if i is None else f"[{i}]"))
                    arrays.append(a.astype(out_dtype[path], copy=False))
                for key, a in zip(rule.keys(i), rule.to_torch(arrays)):
                    writer.write(prefix + key, a)
                    count(key, a.nbytes)
        if fmt == "hf":
            writer.write_index()
            released = mapping.to_released(cfg, torch_dtype)
            (tmp / CONFIG).write_text(json.dumps(released, indent=2) + "\n")
            _copy_extras(tmp, info, tokenizer, remote_code, summary, mapping.NEEDS_REMOTE_CODE and not problem)
            if problem:
                summary.notes.append(f"not loadable by the released remote code ({problem}): load it with molmo_jax")
            for name, content in getattr(mapping, "processor_files", lambda cfg: {})(cfg).items():
                (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
    return summary.finish()


def _copy_extras(tmp: pathlib.Path, info, tokenizer, remote_code, summary, needs_remote_code=True):
    if tokenizer is not None:
        copy_tokenizer(tokenizer, tmp)
    else:
        model_dir = info.path if info.kind == "molmo_jax" else info.config_path.parent
        if copy_tokenizer(model_dir / TOKENIZER, tmp, required=False):
            summary.notes.append(f"tokenizer files copied from {model_dir / TOKENIZER}")
    if remote_code is not None:
        remote_code = pathlib.Path(remote_code)
        files = [f for pattern in REMOTE_CODE_FILES for f in remote_code.glob(pattern) if f.is_file()]
        if not files:
            raise WeightsError(f"{remote_code}: no remote-code files ({', '.join(REMOTE_CODE_FILES)})")
        for f in files:
            shutil.copy2(f, tmp / f.name)
    elif needs_remote_code:
        summary.notes.append("the released remote-code files (*.py) are not part of the export; pass "
                             "--remote-code DIR (a released Molmo checkpoint) to copy them")
