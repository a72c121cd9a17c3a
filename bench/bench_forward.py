"""Forward pass of the bench-s configuration and workload on this CPU (issue: the Flax model).

    .venv/bin/python -m bench.bench_forward [--runs 10] [--head all|loss]

Times the jitted loss forward (ViT + connector + LLM + cross-entropy) of a batch of 4 x 768 tokens
with 5 crops per example, in float32, beside this CPU's f32 matmul rate measured in the same run.
`--head loss` applies the output head only at loss-bearing positions (what training uses);
`--head all` computes all B x T x vocab logits, as the original does.
"""
from __future__ import annotations

import argparse

import jax
from flax import nnx

from bench import common
from input_pipeline import random_data as workload
from molmo_jax import config as config_lib
from molmo_jax.analysis import flops as flops_lib
from molmo_jax import losses
from molmo_jax import models as model_lib

ORIGINAL_FORWARD_S = 4.50  # shared/bench/README.md


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--head", choices=["all", "loss"], default="loss")
    args = parser.parse_args()

    jax_rate, torch_rate = common.matmul_gflops("jax"), common.matmul_gflops("torch")
    cfg = config_lib.bench_s()
    model = model_lib.create_model(cfg)
    graphdef, state = nnx.split(model)
    batch = workload.bench_batch(cfg)
    max_loss = 1024

    @jax.jit
    def forward(state, b):
        m = nnx.merge(graphdef, state)
        out = m(b["input_ids"], b["images"], b["image_masks"], b["image_input_idx"],
                return_logits=args.head == "all")
        if args.head == "all":
            return losses.loss_fn(out, b["target_tokens"], b["loss_masks"])[0]
        return losses.sparse_loss(m.llm.logits, out["hidden"], b["target_tokens"], b["loss_masks"], max_loss)[0]

    batch = jax.device_put(batch)
    times = common.time_runs(lambda: forward(state, batch).block_until_ready(), args.runs)
    s = common.summary(times)
    logit_positions = None if args.head == "all" else max_loss // workload.BATCH
    flops = flops_lib.forward_flops(cfg, workload.BATCH, workload.SEQ_LEN, 5, logit_positions)
    flops_all_logits = flops_lib.forward_flops(cfg, workload.BATCH, workload.SEQ_LEN, 5)
    common.report("forward", dict(
        head=args.head, seconds=s, examples_per_s=workload.BATCH / s["median"],
        speedup_vs_original=ORIGINAL_FORWARD_S / s["median"],
        model_gflop=flops / 1e9, achieved_gflops=flops / s["median"] / 1e9,
        jax_matmul_gflops=jax_rate, torch_matmul_gflops=torch_rate,
        fraction_of_jax_matmul=flops / s["median"] / 1e9 / jax_rate,
        original_equivalent_gflops=flops_all_logits / s["median"] / 1e9,
        peak_rss_gb=common.peak_rss_gb()))


if __name__ == "__main__":
    main()
