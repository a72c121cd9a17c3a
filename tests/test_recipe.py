"""Recipe checks at the edge of tools.train and tools.aot: unknown override keys and sizes no run can
use are one line naming the key, before anything is written to the workdir."""
import os
import subprocess
import sys

import pytest

from molmo_jax import recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_pretrain.py")


def test_unknown_override_keys_are_named_with_the_close_ones():
    recipe.check_overrides(["--config", TINY, "--config.batch_size=3", "--config.optimizer.b1=0.8"])
    with pytest.raises(recipe.RecipeError, match=r"--config.batch_sise: .* no key 'batch_sise'; did you mean batch_size\?"):
        recipe.check_overrides([f"--config={TINY}", "--config.batch_sise=3"])
    with pytest.raises(recipe.RecipeError, match=r"no key 'weight_decai' under optimizer; did you mean optimizer.weight_decay"):
        recipe.check_overrides(["--config", TINY, "--config.optimizer.weight_decai=0"])
    with pytest.raises(recipe.RecipeError, match=r"no key 'zzz'; its keys: async_checkpointing, batch_size"):
        recipe.check_overrides(["--config", TINY, "--config.zzz=0"])
    with pytest.raises(recipe.RecipeError, match=r"no key 'x' under seed \(seed is a value\)"):
        recipe.check_overrides(["--config", TINY, "--config.seed.x=0"])
    with pytest.raises(recipe.RecipeError, match="nowhere.py: no such file"):
        recipe.check_overrides(["--config", "nowhere.py", "--config.seed=1"])


def test_sizes_no_run_can_use_are_each_named():
    config = recipe.load_recipe(TINY)
    assert recipe.validate(config) == []
    config.batch_size, config.seq_len, config.grad_accum_steps = 0, -5, 1
    config.mesh.fsdp, config.lora.rank = 0, -1
    problems = recipe.validate(config)
    assert problems == ["batch_size: must be >= 1, got 0", "seq_len: must be >= 1, got -5",
                        "lora.rank: must be >= 0, got -1",
                        "mesh.fsdp: must be a positive size or -1 (the remaining devices), got 0"]
    config = recipe.load_recipe(TINY)
    config.grad_accum_steps = 3
    assert recipe.validate(config) == ["grad_accum_steps: 3 micro-batches do not divide batch_size 4"]


def test_a_mesh_the_devices_cannot_form_is_named():
    config = recipe.load_recipe(TINY)
    assert recipe.validate(config, n_devices=8) == []  # fsdp=-1 takes whatever there is
    config.mesh.fsdp, config.mesh.tensor = -1, 3
    (problem,) = recipe.validate(config, n_devices=8)
    assert problem.startswith("mesh {") and "'tensor': 3" in problem and problem.endswith(": 8 devices are not divisible by 3")
    config.mesh.fsdp = 2
    (problem,) = recipe.validate(config, n_devices=8)
    assert "'fsdp': 2" in problem and problem.endswith("needs 6 devices, but 8 are available")
    assert recipe.validate(config) == []  # without a device count only the sizes themselves are checked


@pytest.mark.parametrize("override, words", [("--config.batch_sise=2", "did you mean batch_size?"),
                                             ("--config.batch_size=-4", "batch_size: must be >= 1, got -4"),
                                             ("--config.mesh.fsdp=1000", "needs 1000 devices, but")])
def test_train_refuses_before_the_workdir_is_touched(tmp_path, override, words):
    workdir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "tools.train", "--config", TINY, "--workdir", str(workdir), override],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not workdir.exists()
