"""End to end: the shortened `make demo` (a few steps of each stage, evaluation, export + reload),
then `tools.eval --checkpoint` on its result."""
import json
import os
import subprocess
import sys

from configs.demo_pretrain import SYNTHETIC_OPTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return e


def test_quick_demo_then_eval_command(tmp_path):
    work = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "tools.demo", "--quick", "--seed", "1", "--workdir", str(work)],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())
    for key in ("pointing_f1", "counting_accuracy", "untrained_pointing_f1", "untrained_counting_accuracy",
                "wall_seconds", "qa_accuracy", "caption_loss"):
        assert key in report, key
    assert report["steps"] == {"stage1": 3, "stage2": 3} and report["seed_offset"] == 1
    assert report["export_max_abs_logit_diff"] == 0.0  # the exported f32 weights are the same numbers
    assert report["caption_loss"] == report["caption_loss"]  # finite, not NaN
    assert report["matmul_gflops"] > 0 and "GFLOP/s (jax float32 2048^3 matmul)" in run.stderr
    for f in ("report.md", "predictions.jsonl", "points.png", "export_hf/config.json",
              "export_hf/model.safetensors.index.json", "export_hf/tokenizer.json", "stage1/metrics.jsonl",
              "stage2/metrics.jsonl"):
        assert (work / f).exists(), f
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(work / "stage2" / "tensorboard"))

    out = tmp_path / "eval"
    ev = subprocess.run([sys.executable, "-m", "tools.eval", "--checkpoint", str(work / "stage2"),
                         "--dataset", "synthetic_counting:test", "--max-examples", "2",
                         "--data-dir", str(work / "data"), "--synthetic-options", SYNTHETIC_OPTIONS,
                         "--split-sizes", "train=64,validation=8,test=16", "--out", str(out)],
                        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    rows = [json.loads(l) for l in open(out / "predictions.jsonl")]
    assert len(rows) == 2 and all("prediction" in r and "count" in r for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["counting"]["accuracy"] <= 1.0


def test_duration_estimate_meets_the_measured_runs_and_falls_with_the_rate():
    from tools import demo

    for rate, seconds in demo.REFERENCE_RUNS:
        assert abs(demo.estimated_seconds(rate) - seconds) < 1e-6
    rates = [20, 60, 80, 90, 106, 200, 400]
    estimates = [demo.estimated_seconds(r) for r in rates]
    assert all(a > b for a, b in zip(estimates, estimates[1:]))
    assert abs(demo.estimated_seconds(40) - 2 * 1305) < 1e-6  # beyond the references: time ~ 1 / rate
