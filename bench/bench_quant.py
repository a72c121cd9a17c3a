"""Weight-only quantization on this CPU: greedy decode speed at batch 1 and agreement with float32.

    .venv/bin/python -m bench.bench_quant [--runs 3] [--new-tokens 32]

Speed: the bench-s Molmo (random weights) decoding 32 tokens after the shared workload's prompt (one
640x480 image, 768 tokens), float32 vs its LLM kernels quantized int8 (per channel) and int4 (groups
of 128), runs alternating in one process. Agreement: the golden models' prompts (tests/fixtures,
the original's random weights), the fraction of positions whose top-1 next token is the same as in
float32, and the largest logit change.
"""
from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from input_pipeline import random_data as workload  # noqa: E402
from molmo_jax import config as config_lib  # noqa: E402
from molmo_jax import generate as gen_lib  # noqa: E402
from molmo_jax import models as model_lib  # noqa: E402
from molmo_jax import weights  # noqa: E402
from molmo_jax.layers import quant  # noqa: E402

KINDS = ("float", "int8", "int4")
GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "golden",
                      "models")


def decode_runners(new_tokens: int) -> dict:
    cfg = config_lib.bench_s()
    batch = workload.bench_batch(cfg, batch=1, seed=0)
    batch = {k: batch[k] for k in gen_lib.MODEL_INPUTS}
    never = config_lib.image_token_ids(cfg)["image"]  # the head cannot produce it: no early stop
    runners = {}
    for kind in KINDS:
        model = model_lib.create_model(cfg, 0)
        if kind != "float":
            quant.quantize_model(model, quant.parse(kind))
        gen = gen_lib.Generator(model, never)

        def run(gen=gen):
            timings = {}
            gen(batch, gen_lib.Sampling(max_new_tokens=new_tokens), timings=timings)
            return timings["decode_s"] / (new_tokens - 1)
        run()  # compile
        runners[kind] = run
    return runners


def agreement(name: str, kind: str) -> dict:
    path = os.path.join(GOLDEN, name)
    inputs = np.load(os.path.join(path, "inputs.npz"))
    args = [jnp.asarray(inputs[k]) for k in ("loss_input_ids", "images", "image_masks", "image_input_idx")]
    _, ref = weights.load(path)
    _, q = weights.load(path, quantize=kind)
    a, b = ref(*args)["logits"][0], q(*args)["logits"][0]
    return dict(top1_agreement=float(jnp.mean(jnp.argmax(a, -1) == jnp.argmax(b, -1))),
                max_logit_change=float(jnp.abs(a - b).max()), positions=int(a.shape[0]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    runners = decode_runners(args.new_tokens)
    times = {k: [] for k in KINDS}
    for _ in range(args.runs):
        for kind, run in runners.items():
            times[kind].append(run())
    speed = {k: dict(ms_per_token=1e3 * statistics.median(t), tokens_per_s=1 / statistics.median(t))
             for k, t in times.items()}
    for k in KINDS[1:]:
        speed[k]["speedup_vs_float"] = speed[k]["tokens_per_s"] / speed["float"]["tokens_per_s"]
    golden = {f"{name} {kind}": agreement(name, kind) for name in ("olmo_style", "qwen2_style")
              for kind in ("int8", "int4:16")}
    common.report("quant", dict(config="bench_s", new_tokens=args.new_tokens, decode=speed, golden=golden,
                                jax_devices=str(jax.devices()), jax_matmul_gflops=common.matmul_gflops("jax")))


if __name__ == "__main__":
    main()
