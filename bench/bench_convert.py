"""Peak memory of the converter on a synthetic multi-GB checkpoint.

    python -m bench.bench_convert [--d-model 2048] [--n-layers 16] [--mlp-dim 8192] [--workdir DIR] [--keep]

1. Writes a synthetic Molmo in the released HF layout (float32 random values, 2 GB shards), one
   tensor at a time: a d_model x n_layers decoder plus the released CLIP ViT-L (23 layers).
2. Runs `python -m tools.convert import` (HF dir -> molmo_jax) and `export` (-> HF dir) as child
   processes under GNU `/usr/bin/time -v`, which reports each one's peak RSS (ru_maxrss).
   A child that loads the converter and saves a 4-element orbax checkpoint gives the fixed cost.
3. Checks that the export reproduces the source bytes on a sample of tensors, prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from molmo_jax import config as config_lib
from molmo_jax.weights import safetensors_out
from molmo_jax.weights.mappings import molmo as molmo_mapping
from molmo_jax.weights.params import param_paths
from molmo_jax.weights.rules import torch_shapes
from molmo_jax.weights.tensors import SafetensorsFile

TIME = "/usr/bin/time"  # GNU time
# The fixed cost: Python, jax, orbax and tensorstore loaded, and one tiny orbax save (which starts
# jax's CPU backend and orbax's threads: about 200 MB by itself).
BASELINE = """
import numpy as np, orbax.checkpoint as ocp, molmo_jax.weights, tools.convert
ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).save("{}", args=ocp.args.PyTreeSave({{"x": np.zeros(4)}}))
"""


def synthetic_config(d_model, n_layers, mlp_dim):
    heads = d_model // 128
    return config_lib.model_config("bench_convert", config_lib.llm_config(
        d_model=d_model, n_layers=n_layers, n_heads=heads, n_kv_heads=heads, head_dim=128, mlp_dim=mlp_dim,
        vocab_size=32000, embedding_size=32000, qkv_bias=True))


def write_source(cfg, directory: pathlib.Path, shard_bytes=2 * 10**9) -> dict:
    directory.mkdir(parents=True)
    entries = [(molmo_mapping.PREFIX + k, s, "float32") for k, s in torch_shapes(molmo_mapping.rules(cfg), cfg).items()]
    shards = safetensors_out.plan_shards(entries, shard_bytes)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    rng = np.random.default_rng(0)
    with safetensors_out.ShardWriter(directory, shards, names, {"format": "pt"}) as writer:
        for key, shape, _ in entries:
            writer.write(key, (0.02 * rng.standard_normal(shape, np.float32)))
    writer.write_index()
    (directory / "config.json").write_text(json.dumps(molmo_mapping.to_released(cfg, "float32"), indent=2))
    sizes = [safetensors_out.nbytes(s, d) for _, s, d in entries]
    return {"bytes": sum(sizes), "tensors": len(sizes), "largest_tensor_bytes": max(sizes), "shards": len(shards)}


def run_measured(args) -> dict:
    """Run a child process; its wall time and peak RSS in bytes. /usr/bin/time -v reports the
    kernel's ru_maxrss of the child it forks. (Not os.wait4 on a child of this process: a fork
    starts with this process's pages, which the high-water mark would count.)"""
    start = time.time()
    proc = subprocess.run([TIME, "-v", sys.executable, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"seconds": round(time.time() - start, 1), "peak_rss_bytes": int(match.group(1)) * 1024,
            "stdout": proc.stdout}


def largest_stacked_leaf_bytes(cfg) -> int:
    return max(int(np.prod(s)) * 4 for p, s in param_paths(cfg).items() if "blocks" in p)


def same_tensors(src: pathlib.Path, dst: pathlib.Path, keys) -> bool:
    def read(directory, key):
        index = json.loads((directory / safetensors_out.INDEX).read_text())
        return SafetensorsFile(directory / index["weight_map"][key]).read(key)
    return all(np.array_equal(read(src, k), read(dst, k)) for k in keys)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--n-layers", type=int, default=16)
    parser.add_argument("--mlp-dim", type=int, default=8192)
    parser.add_argument("--workdir", default="/tmp/molmo_convert_bench")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints written")
    args = parser.parse_args(argv)
    work = pathlib.Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    cfg = synthetic_config(args.d_model, args.n_layers, args.mlp_dim)
    try:
        t = time.time()
        source = write_source(cfg, work / "hf_src")
        source["write_seconds"] = round(time.time() - t, 1)
        baseline = run_measured(["-c", BASELINE.format(work / "baseline")])
        convert = ["-m", "tools.convert"]
        imp = run_measured(convert + ["import", str(work / "hf_src"), str(work / "molmo"), "--no-progress"])
        exp = run_measured(convert + ["export", str(work / "molmo"), str(work / "hf_out"), "--no-progress"])
        n = cfg.llm.n_layers - 1
        sample = [molmo_mapping.PREFIX + k for k in ("transformer.wte.embedding", f"transformer.blocks.{n}.ff_proj.weight",
                                       f"transformer.blocks.{n}.att_proj.bias",
                                       "vision_backbone.image_vit.transformer.resblocks.22.feed_forward.w1.weight")]
        result = {
            "config": {"d_model": args.d_model, "n_layers": args.n_layers, "mlp_dim": args.mlp_dim},
            "checkpoint_bytes": source["bytes"], "tensors": source["tensors"], "source_shards": source["shards"],
            "largest_tensor_bytes": source["largest_tensor_bytes"],
            "largest_stacked_leaf_bytes": largest_stacked_leaf_bytes(cfg),
            "baseline_peak_rss_bytes": baseline["peak_rss_bytes"],
            "import": {k: v for k, v in imp.items() if k != "stdout"},
            "export": {k: v for k, v in exp.items() if k != "stdout"},
            "round_trip_sample_identical": same_tensors(work / "hf_src", work / "hf_out", sample),
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    gb = 1e9
    print(f"| {result['checkpoint_bytes'] / gb:.2f} GB | {result['largest_tensor_bytes'] / gb:.2f} GB | "
          f"{result['largest_stacked_leaf_bytes'] / gb:.2f} GB | {result['baseline_peak_rss_bytes'] / gb:.2f} GB | "
          f"{imp['peak_rss_bytes'] / gb:.2f} GB ({imp['seconds']} s) | "
          f"{exp['peak_rss_bytes'] / gb:.2f} GB ({exp['seconds']} s) |")


if __name__ == "__main__":
    main()
