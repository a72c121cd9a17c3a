"""What a path is: one of this project's model directories, a training run (its latest finished
step) or one of its step directories, or a PyTorch checkpoint (original / released HF directory, or
a state dict file). Every tool that takes a checkpoint path goes through `find_checkpoint`.
"""
from __future__ import annotations

import dataclasses
import pathlib

from molmo_jax.weights.configs import is_model_config
from molmo_jax.weights.errors import WeightsError, read_json

CONFIG = "config.json"
PARAMS = "params"
TOKENIZER = "tokenizer"
TORCH_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                      "pytorch_model.bin")
TORCH_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclasses.dataclass
class CheckpointInfo:
    kind: str                            # "molmo_jax", "training" or "pytorch"
    path: pathlib.Path                   # what was asked for
    config_path: pathlib.Path | None     # None: a bare PyTorch state dict file
    params_dir: pathlib.Path | None = None
    step: int | None = None


def _is_molmo_config(path: pathlib.Path) -> bool:
    return path.is_file() and is_model_config(read_json(path))


def _latest_step(checkpoints: pathlib.Path) -> pathlib.Path | None:
    """The highest finished step: orbax renames a step directory to its number only once it is
    complete, so unfinished ones (`<step>.orbax-checkpoint-tmp-*`) are skipped."""
    steps = [p for p in checkpoints.iterdir() if p.name.isdigit() and (p / PARAMS).is_dir()]
    return max(steps, key=lambda p: int(p.name)) if steps else None


def find_checkpoint(path) -> CheckpointInfo:
    """What `path` is: a molmo_jax model directory, a training run (WORKDIR: its latest step) or one
    step directory of it, or a PyTorch checkpoint (original / HF directory, or a state dict file)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix in TORCH_FILE_SUFFIXES:
            config = path.parent / CONFIG
            return CheckpointInfo("pytorch", path, config if config.is_file() else None)
        raise WeightsError(f"{path}: not a checkpoint (a file should be a PyTorch state dict: "
                           f"{', '.join(TORCH_FILE_SUFFIXES)})")
    if (path / PARAMS).is_dir() and _is_molmo_config(path / CONFIG):
        return CheckpointInfo("molmo_jax", path, path / CONFIG, path / PARAMS)
    if (path / "checkpoints").is_dir() and _is_molmo_config(path / CONFIG):
        step = _latest_step(path / "checkpoints")
        if step is None:
            raise WeightsError(f"{path}: a training directory without any finished checkpoint "
                               f"in {path / 'checkpoints'}")
        return CheckpointInfo("training", path, path / CONFIG, step / PARAMS, int(step.name))
    if path.name.isdigit() and (path / PARAMS).is_dir():
        for config in (path / CONFIG, path.parent.parent / CONFIG):
            if _is_molmo_config(config):
                return CheckpointInfo("training", path, config, path / PARAMS, int(path.name))
        raise WeightsError(f"{path}: a training step directory, but no molmo_jax config.json was found "
                           f"in it or at {path.parent.parent / CONFIG}")
    if (path / CONFIG).is_file() and any((path / name).is_file() for name in TORCH_WEIGHT_FILES):
        return CheckpointInfo("pytorch", path, path / CONFIG)
    raise WeightsError(
        f"{path}: not a checkpoint. Expected a molmo_jax model directory ({CONFIG} + {PARAMS}/), a training "
        f"directory (config.json + checkpoints/<step>/params/) or one of its step directories, or a PyTorch "
        f"directory (config.json + one of {', '.join(TORCH_WEIGHT_FILES)})")
