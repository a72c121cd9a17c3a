"""Greedy decoding speed of the bench-s configuration on this CPU, beside transformers' Qwen2.

    .venv/bin/python -m bench.bench_decode [--runs 5] [--new-tokens 32] [--batches 1,8]

molmo_jax: the whole bench-s Molmo (random weights, float32), prompts in the shared workload's
layout: one 640x480 image per prompt (tiling 2x2 -> 5 crops), 768 prompt tokens, 32 new tokens,
greedy, EOS never hit. transformers: `Qwen2ForCausalLM` of the same LLM size (d 512, 8 layers,
8 heads / 4 kv heads, SwiGLU 1408, vocab 32000, qkv bias, float32, random weights) and
`generate(do_sample=False)` with its KV cache on 768-token text prompts (no image: the decode steps
are the same work; its prefill has no ViT). Each library runs in its own worker process.

Prefill = the prompt's forward until the first new token; per-step = the rest of the decode divided
by its N - 1 forward steps (molmo_jax: `Generator(..., timings=)`; transformers: times at which
its streamer receives each token). Runs of the two libraries alternate, so a change in the
machine's load hits both; medians and minimums are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from input_pipeline import random_data as workload  # noqa: E402
from molmo_jax import config as config_lib  # noqa: E402
from molmo_jax import generate as gen_lib  # noqa: E402
from molmo_jax import models as model_lib  # noqa: E402

ORIGINAL_PREFILL_S = 1.03        # shared/bench/README.md, batch 1
ORIGINAL_TOKEN_S = 0.076         # = 13 tokens/s


def molmo_runner(cfg, batch_size, seed=0):
    """fn(n_new_tokens) -> (prefill seconds, decode seconds) of one generate call."""
    model = model_lib.create_model(cfg, seed)
    never = config_lib.image_token_ids(cfg)["image"]  # the output head cannot produce it: no early stop
    gen = gen_lib.Generator(model, never)
    del model  # the generator keeps per-layer copies of the blocks
    batch = workload.bench_batch(cfg, batch=batch_size, seed=seed)
    batch = {k: batch[k] for k in gen_lib.MODEL_INPUTS}

    def run(n):
        timings = {}
        out = gen(batch, gen_lib.Sampling(max_new_tokens=n), timings=timings)
        assert out["lengths"].min() == n
        return timings["prefill_s"], timings["decode_s"]
    return run


class _TokenTimes:
    """A transformers streamer that only records when each put() arrives (the prompt comes first)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def transformers_runner(cfg, batch_size, seed=0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    l = cfg.llm
    torch.manual_seed(seed)
    hf_cfg = Qwen2Config(hidden_size=l.d_model, num_hidden_layers=l.n_layers, num_attention_heads=l.n_heads,
                         num_key_value_heads=l.n_kv_heads, intermediate_size=l.mlp_dim, vocab_size=l.embedding_size,
                         rope_theta=l.rope_theta, rms_norm_eps=l.norm_eps, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(hf_cfg).eval()
    ids = torch.as_tensor(np.random.default_rng(seed).integers(0, 300, (batch_size, workload.SEQ_LEN)))
    mask = torch.ones_like(ids)

    def run(n):
        stream = _TokenTimes()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 use_cache=True, pad_token_id=0, eos_token_id=None, streamer=stream)
        assert out.shape[1] == workload.SEQ_LEN + n and len(stream.times) == n + 1
        return stream.times[1] - start, stream.times[-1] - stream.times[1]
    return run


RUNNERS = {"molmo_jax": molmo_runner, "transformers": transformers_runner}


def worker(name, batch, n):
    """One library in its own process: compile/warm up, then time one generate call per "run" line."""
    run = RUNNERS[name](config_lib.bench_s(), batch)
    run(n)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(run(n)), flush=True)


def measure(batch: int, n: int, runs: int) -> dict:
    """{name: [(prefill_s, decode_s), ...]}. Each library runs in its own worker process (neither's
    idle thread pool competes with the other's) and the runs alternate between them."""
    workers = {name: subprocess.Popen([sys.executable, "-m", "bench.bench_decode", "--worker", name,
                                       "--batches", str(batch), "--new-tokens", str(n)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for name in RUNNERS}
    try:
        for name, w in workers.items():
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {name} worker failed (see its error above)")
        times = {name: [] for name in workers}
        for _ in range(runs):
            for name, w in workers.items():
                w.stdin.write("run\n")
                w.stdin.flush()
                times[name].append(tuple(json.loads(w.stdout.readline())))
        return times
    finally:
        for w in workers.values():
            w.stdin.close()
            w.wait()


def summarise(runs, n, batch):
    prefill = [p for p, _ in runs]
    per_step = [d / (n - 1) for _, d in runs]
    med = statistics.median(per_step)
    return dict(prefill_s=dict(median=statistics.median(prefill), min=min(prefill)),
                ms_per_step=dict(median=1e3 * med, min=1e3 * min(per_step)),
                tokens_per_s=batch / med, runs=len(runs))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, int(args.batches), args.new_tokens)
    cfg = config_lib.bench_s()
    n = args.new_tokens
    results = {}
    for batch in (int(b) for b in args.batches.split(",")):
        times = measure(batch, n, args.runs)
        res = {name: summarise(t, n, batch) for name, t in times.items()}
        ours, theirs = res["molmo_jax"], res["transformers"]
        res["speedup_vs_transformers"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
        if batch == 1:
            res["speedup_vs_original"] = ours["tokens_per_s"] / (1 / ORIGINAL_TOKEN_S)
            res["original"] = dict(prefill_s=ORIGINAL_PREFILL_S, ms_per_step=1e3 * ORIGINAL_TOKEN_S,
                                   tokens_per_s=1 / ORIGINAL_TOKEN_S)
        results[f"batch_{batch}"] = res
    common.report("decode", dict(config="bench_s", prompt_tokens=workload.SEQ_LEN, crops=5, new_tokens=n,
                                 jax_devices=str(jax.devices()), jax_matmul_gflops=common.matmul_gflops("jax"),
                                 torch_matmul_gflops=common.matmul_gflops("torch"), **results))


if __name__ == "__main__":
    main()
