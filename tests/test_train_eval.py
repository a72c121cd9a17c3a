"""Evaluation inside training: validation loss and a small generation eval, logged as eval/*."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_periodic_eval_is_logged(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "tools.train", "--config", "configs/tiny_sft.py", "--workdir", str(tmp_path / "w"),
           "--config.total_steps=2", "--config.eval_every=2", "--config.eval_examples=2", "--config.eval_batches=1",
           "--config.batch_size=2", "--config.seq_len=256", f"--config.data.data_dir={tmp_path / 'data'}",
           "--config.data.synthetic_split_sizes=train=16,validation=8,test=4", "--progress=false"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl")]
    evals = [r for r in rows if "eval/val_loss" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2
    assert evals[0]["eval/val_loss"] > 0
    for key in ("eval/pointing/f1", "eval/counting/accuracy", "eval/exact/accuracy"):
        assert 0.0 <= evals[0][key] <= 1.0, key
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    # The evaluation reads the dataset the training built (its split sizes), not a second build.
    built = [p.parent.name for p in (tmp_path / "data").rglob("dataset_info.json")]
    assert len(built) == 1, built


def test_bad_training_data_is_one_line_before_any_work(tmp_path):
    """An unknown dataset name and an unbuilt dataset: exit 2, one line naming the problem, no
    traceback, no workdir written."""
    for mixture, says in (("no_such_set:1.0", "unknown dataset 'no_such_set'"),
                          ("pixmo_points:1.0", "not built under")):
        cmd = [sys.executable, "-m", "tools.train", "--config", "configs/tiny_sft.py", "--workdir",
               str(tmp_path / "w"), "--config.data.kind=mixture", f"--config.data.mixture={mixture}",
               f"--config.data.data_dir={tmp_path / 'data'}", "--progress=false"]
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert run.returncode == 2, run.stderr[-2000:]
        assert run.stderr.startswith("error: training data: ") and says in run.stderr, run.stderr[-2000:]
        assert "Traceback" not in run.stderr
        assert not (tmp_path / "w").exists()
