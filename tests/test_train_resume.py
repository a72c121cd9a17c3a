"""Never lose work: SIGKILL + restart repeats the uninterrupted losses bit for bit, SIGTERM saves,
non-finite steps are skipped and eventually stop the run, incomplete checkpoints are ignored and a damaged
latest one gives way to the one before."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny_pretrain
from input_pipeline.random_data import RandomBatches
from molmo_jax import sharding
from molmo_jax import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


def train_cmd(workdir, *extra):
    return [sys.executable, "-m", "tools.train", "--config", "configs/tiny_pretrain.py", "--workdir", str(workdir),
            f"--config.total_steps={STEPS}", "--config.checkpoint_every=2", "--config.log_every=1",
            "--config.seq_len=256", "--config.batch_size=2", "--config.data.kind=random", "--progress=false", *extra]


def env():
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return e


def losses(workdir):
    """step -> loss; a resumed run logs some steps twice, the last entry is the resumed one."""
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


def wait_for_step(workdir, step, proc, timeout=240):
    path = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path) and any(json.loads(l)["step"] >= step for l in open(path)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training")


def test_sigkill_and_restart_is_bit_identical(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(train_cmd(ref), cwd=ROOT, env=env(), check=True, capture_output=True, timeout=600)
    expected = losses(ref)
    assert sorted(expected) == list(range(1, STEPS + 1))

    run = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(run), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_step(run, 5, proc)  # checkpoints exist at 2 and 4; an async save of 6 may be under way
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(train_cmd(run), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # exact float equality, every step


def test_sigterm_saves_a_final_checkpoint(tmp_path):
    run = tmp_path / "term"
    cmd = train_cmd(run)
    cmd[cmd.index(f"--config.total_steps={STEPS}")] = "--config.total_steps=1000"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    last_logged = max(losses(run))
    saved = sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())
    assert saved[-1] == last_logged >= 3  # the step it stopped at is saved, not just a periodic one


class PoisonedBatches(RandomBatches):
    """Random batches whose images turn NaN from batch `start` on."""

    def __init__(self, *a, start=2, **k):
        super().__init__(*a, **k)
        self.start = start

    def __next__(self):
        i = self.index
        b = super().__next__()
        if i >= self.start:
            b["images"] = np.full_like(b["images"], np.nan)
        return b


def small_trainer(tmp_path, **overrides):
    c = tiny_pretrain.get_config()
    c.update(dict(batch_size=2, seq_len=128, total_steps=10, checkpoint_every=2, async_checkpointing=False))
    c.update(overrides)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1), devices=jax.devices()[:1])
    return c, trainer_lib.Trainer(c, str(tmp_path), mesh=mesh)


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    c, t = small_trainer(tmp_path, max_bad_steps=3)
    data = PoisonedBatches(c.model, batch_size=2, seq_len=128, seed=0, text_len=40, start=2)
    with pytest.raises(trainer_lib.TrainingStopped, match="3 steps in a row had a non-finite loss"):
        t.fit(data, progress=False)
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["skipped"] for r in rows[:4]] == [0, 0, 1, 1]
    # Skipped steps leave the parameters as they were after step 2: checkpoints written during the
    # streak (step 4) hold those good parameters, and so does the trainer.
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, t.params)

    def saved(step):
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
        return t.manager.restore(step, args=args)["params"]
    for a, b, c in zip(jax.tree.leaves(t.params), jax.tree.leaves(saved(2)), jax.tree.leaves(saved(4))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(c))


def test_incomplete_checkpoint_is_ignored(tmp_path):
    c, t = small_trainer(tmp_path, total_steps=2)
    t.fit(RandomBatches(c.model, batch_size=2, seq_len=128, seed=0, text_len=40), progress=False)
    # A save killed midway leaves a temporary directory behind.
    os.makedirs(tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-123" / "params")
    _, t2 = small_trainer(tmp_path, total_steps=2)
    assert t2.restore_latest() and t2.step == 2


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, damage, capfd):
    """A file of the newest checkpoint truncated or missing: the restart warns naming it, keeps it on
    disk (moved aside), resumes from the step before, and trains and saves through that step again."""
    c, t = small_trainer(tmp_path / "run", total_steps=4)
    data = lambda: RandomBatches(c.model, batch_size=2, seq_len=128, seed=0, text_len=40)  # noqa: E731
    t.fit(data(), progress=False)
    t.manager.wait_until_finished()
    files = sorted(p for p in (tmp_path / "run" / "checkpoints" / "4" / "params").rglob("*") if p.is_file()
                   and p.stat().st_size > 0)
    target = max(files, key=lambda p: p.stat().st_size)  # the biggest array file
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.unlink()
    _, t2 = small_trainer(tmp_path / "run", total_steps=4)
    assert t2.restore_latest() and t2.step == 2
    err = capfd.readouterr().err
    assert "warning: checkpoint step 4" in err and "cannot be restored" in err and "not deleted" in err
    assert (tmp_path / "run" / "checkpoints" / "4.damaged").is_dir()
    assert not (tmp_path / "run" / "checkpoints" / "4").exists()
    t2.fit(data(), progress=False)  # steps 3 and 4 again, saving step 4 anew
    assert t2.step == 4 and 4 in t2.manager.all_steps()
