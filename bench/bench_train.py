"""Training step of the bench-s configuration and workload on this CPU.

    .venv/bin/python -m bench.bench_train [--runs 8] [--remat full|none|dots] [--scan-unroll N]
                                          [--dtype float32|bfloat16] [--lora-rank R]
                                          [--lora-base keep|bfloat16|int8|int4] [--loss-chunk-tokens N]
                                          [--vit-crop-chunk N]

Forward + backward + AdamW (lr 1e-4) on a batch of 4 x 768 tokens with 5 crops per example, float32
(unless `--dtype`), through the real trainer step (one device). Reports the median step time, the peak resident memory
of this process, and the model FLOP rate against this CPU's matmul rate measured in the same run.
`--dtype bfloat16` computes in bf16 (parameters and optimizer state stay f32); its rate is then set
against the bf16 matmul rate as well as the f32 one. `--lora-rank R` trains rank-R adapters on the
LLM's projections alone (the base frozen, no optimizer state for it), `--lora-base` stores that base
in bfloat16 or quantized; run each in its own process to compare peak memory with full fine-tuning.
`--loss-chunk-tokens N` runs the output head and softmax on N positions at a time. Memory is
reported three ways: the process's peak RSS (setup and compile included), the peak RSS over the
timed steps alone (`step_peak_rss_gb`), and XLA's buffers of the compiled step (`step_buffers`).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp

from bench import common
from configs import base
from input_pipeline.random_data import BATCH, SEQ_LEN, RandomBatches
from molmo_jax import config as config_lib
from molmo_jax.analysis import flops as flops_lib
from molmo_jax import sharding
from molmo_jax import trainer as trainer_lib

ORIGINAL_STEP_S, ORIGINAL_PEAK_GB, ORIGINAL_STEP_TFLOP = 14.25, 5.96, 1.36  # shared/bench/README.md


def build_step(remat: str, scan_unroll: int, max_loss_tokens: int, dtype: str = "float32", lora_rank: int = 0,
               lora_base: str = "keep", loss_chunk_tokens: int = 0, vit_crop_chunk: int = 0):
    """The bench-s config and a function running one real trainer step on one device (blocks until done)."""
    c = base.base(config_lib.bench_s(), "sft")
    c.update(dict(batch_size=BATCH, seq_len=SEQ_LEN, total_steps=10_000, max_loss_tokens=max_loss_tokens,
                  async_checkpointing=False))
    c.model.remat = remat
    c.model.scan_unroll = scan_unroll
    c.model.dtype = dtype
    c.lora.rank = lora_rank
    c.lora.base_weights = lora_base
    c.loss_chunk_tokens = loss_chunk_tokens
    c.model.vit.crop_chunk = vit_crop_chunk
    for group in ("connector", "vit", "llm"):
        c.optimizer.groups[group].update(lr=1e-4, warmup=1)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1), devices=jax.devices()[:1])
    trainer = trainer_lib.Trainer(c, tempfile.mkdtemp(), mesh=mesh)
    batch = trainer._global_batch(next(RandomBatches(c.model, BATCH, SEQ_LEN)))
    state = {"params": trainer.params, "opt": trainer.opt_state, "i": 0}

    def step():
        with sharding.use_mesh(mesh):
            p, o, m = trainer._step(state["params"], state["opt"], batch, jnp.int32(state["i"]))
        jax.block_until_ready(m["loss"])
        state.update(params=p, opt=o, i=state["i"] + 1)

    def compiled():
        with sharding.use_mesh(mesh):
            return trainer._step.lower(state["params"], state["opt"], batch, jnp.int32(0)).compile()
    step.compiled = compiled
    step.compiled_text = lambda: compiled().as_text()  # the optimised HLO, for bench/profile_train.py
    return c, step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots"],
                        help="full: faster and 2.7x less memory than none on this CPU (docs/benchmarks.md)")
    parser.add_argument("--max-loss-tokens", type=int, default=1024,
                        help="head applied at this many positions per step (0 = all B x T)")
    parser.add_argument("--scan-unroll", type=int, default=1, help="layers per scan iteration")
    parser.add_argument("--dtype", default="float32", choices=common.MATMUL_DTYPES, help="compute dtype")
    parser.add_argument("--lora-rank", type=int, default=0, help="train rank-R adapters alone (0: full fine-tuning)")
    parser.add_argument("--lora-base", default="keep", choices=("keep", "bfloat16", "int8", "int4"),
                        help="how the frozen base of --lora-rank is stored")
    parser.add_argument("--loss-chunk-tokens", type=int, default=0, help="head on this many positions at a time")
    parser.add_argument("--vit-crop-chunk", type=int, default=0, help="crops the vision tower encodes at a time (0: all)")
    args = parser.parse_args()

    c, step = build_step(args.remat, args.scan_unroll, args.max_loss_tokens, args.dtype, args.lora_rank,
                         args.lora_base, args.loss_chunk_tokens, args.vit_crop_chunk)
    for _ in range(2):  # warm-up: compile and the first steps
        step()
    peak_gb = common.peak_rss_gb()
    steps_only = common.reset_peak_rss()
    times = common.time_runs(step, args.runs, warmup=0)
    step_peak_gb = common.peak_rss_gb() if steps_only else None
    # The machine's matmul rates are taken after the memory: torch's runtime alone holds ~0.3 GB, which
    # a training process (no torch) never has.
    jax_rate = common.matmul_gflops("jax")
    torch_rate = common.matmul_gflops("torch")
    bf16_rate = common.matmul_gflops("jax", "bfloat16") if args.dtype == "bfloat16" else None
    s = common.summary(times)
    heads = None if not args.max_loss_tokens else args.max_loss_tokens // BATCH
    ours = flops_lib.train_step_flops(c.model, BATCH, SEQ_LEN, 5, heads)
    common.report("train_step", dict(
        remat=args.remat, dtype=args.dtype, scan_unroll=args.scan_unroll, max_loss_tokens=args.max_loss_tokens,
        lora_rank=args.lora_rank, lora_base=args.lora_base, loss_chunk_tokens=args.loss_chunk_tokens,
        vit_crop_chunk=args.vit_crop_chunk,
        seconds=s,
        examples_per_s=BATCH / s["median"], speedup_vs_original=ORIGINAL_STEP_S / s["median"],
        peak_rss_gb=max(peak_gb, step_peak_gb or 0), peak_vs_original=max(peak_gb, step_peak_gb or 0) / ORIGINAL_PEAK_GB,
        step_peak_rss_gb=step_peak_gb, step_buffers=common.compiled_memory(step.compiled()),
        executed_gflop=ours / 1e9, executed_gflops=ours / s["median"] / 1e9,
        original_count_gflops=ORIGINAL_STEP_TFLOP * 1e3 / s["median"],
        jax_matmul_gflops=jax_rate, torch_matmul_gflops=torch_rate,
        mfu_vs_jax_matmul=ours / s["median"] / 1e9 / jax_rate,
        original_count_vs_jax_matmul=ORIGINAL_STEP_TFLOP * 1e3 / s["median"] / jax_rate,
        **({} if bf16_rate is None else dict(jax_bf16_matmul_gflops=bf16_rate,
                                             mfu_vs_jax_bf16_matmul=ours / s["median"] / 1e9 / bf16_rate))))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
