"""`make demo`: the whole system on a laptop CPU in minutes.

    python -m tools.demo [--workdir runs/demo] [--quick]

data (the synthetic PixMo, built on first use) -> stage 1: caption pretraining of a small Molmo from
scratch -> stage 2: multitask fine-tuning (pointing, counting, QA, clocks, charts) -> evaluation of
the untrained and the trained model on the test split with the real metrics -> export to the
released Hugging Face layout and reload, checking the logits. Writes WORKDIR/report.json and
report.md, WORKDIR/points.png (test images with predicted and true points), TensorBoard logs and
metrics.jsonl under WORKDIR/stage1 and WORKDIR/stage2. Re-running resumes finished stages.
`--quick` is the shortened run the test suite uses (a few steps each, a few eval examples).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

TASKS = ("synthetic_pointing", "synthetic_counting", "synthetic_qa")
# Whole-demo wall seconds of `make demo` on two idle 2-core machines, against their jax f32 2048^3
# matmul rate (docs/benchmarks.md#the-shipped-config): the estimate interpolates between them in
# log-log and scales as 1 / rate beyond them.
REFERENCE_RUNS = ((80.0, 1305.0), (106.0, 645.0))


def matmul_rate(n: int = 2048, runs: int = 7) -> float:
    """This CPU's jax float32 n^3 matmul rate in GFLOP/s (median of `runs`), as docs/benchmarks.md quotes."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    product = jax.jit(lambda x: x @ x)
    product(a).block_until_ready()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        product(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / sorted(times)[runs // 2] / 1e9


def estimated_seconds(rate: float) -> float:
    """The full demo's expected wall time on a machine of this matmul rate (see REFERENCE_RUNS)."""
    (r0, t0), (r1, t1) = REFERENCE_RUNS
    if rate <= r0:
        return t0 * r0 / rate
    if rate >= r1:
        return t1 * r1 / rate
    k = np.log(t1 / t0) / np.log(r1 / r0)
    return float(t0 * (rate / r0) ** k)


def configs(workdir: str, quick: bool, seed: int = 0):
    from configs import demo_pretrain, demo_sft

    stages = []
    for module, name in ((demo_pretrain, "stage1"), (demo_sft, "stage2")):
        c = module.get_config()
        c.data.data_dir = os.path.join(workdir, "data")
        if seed:  # another initialisation and data order; the same data
            c.seed += seed
            c.data.seed += seed
        if quick:
            c.total_steps, c.checkpoint_every, c.log_every = 3, 3, 1
            c.batch_size = 4
            c.data.synthetic_split_sizes = "train=64,validation=8,test=16"
        stages.append((name, c))
    return stages


def evaluate(model, tokenizer, c, n_examples: int, bar_desc: str):
    from tqdm import tqdm

    from input_pipeline import synthetic_options, synthetic_split_sizes
    from input_pipeline.evaluation import make_eval_examples
    from molmo_jax import evaluate as eval_lib

    examples = []
    for task in TASKS:
        examples += list(make_eval_examples(task, "test", c.data.data_dir, limit=n_examples,
                                            split_sizes=synthetic_split_sizes(c), options=synthetic_options(c)))
    # The demo's bar: a predicted point is a hit within 5% of the image size of a true point.
    settings = eval_lib.EvalSettings(batch_size=16, distance_fraction=0.05, seq_buckets=(c.seq_len,))
    with tqdm(total=len(examples), desc=bar_desc, unit="ex", file=sys.stderr) as bar:
        rows, results = eval_lib.run(model, tokenizer, examples, settings, progress=bar.update)
    return examples, rows, results


def caption_loss(model, c1, batches: int = 4) -> float:
    """Mean token loss on validation captions, formatted as in stage 1."""
    import itertools

    import input_pipeline
    from molmo_jax.evaluate import mean_loss

    loader = input_pipeline.make_loader(c1, split="validation")
    try:
        return mean_loss(model, itertools.islice(loader, batches))
    finally:
        if hasattr(loader, "close"):
            loader.close()


def train(name, c, workdir, init_params=None):
    import jax

    import input_pipeline
    from molmo_jax import trainer as trainer_lib

    t = trainer_lib.Trainer(c, os.path.join(workdir, name))
    if not t.restore_latest() and init_params is not None:
        t.load_params(init_params)
    if t.step < c.total_steps:
        print(f"{name}: training {c.total_steps - t.step} steps ({c.stage})", file=sys.stderr)
        t.fit(input_pipeline.make_train_iterator(c, jax.process_index(), jax.process_count()))
    return t


def draw_grid(rows, examples, path, n=8, scale=2):
    from PIL import Image

    from molmo_jax import points as points_lib

    pointing = [(r, e) for r, e in zip(rows, examples) if r["task"] == "pointing"][:n]
    tiles = []
    for r, e in pointing:
        parsed = points_lib.parse_points(r["prediction"], r["image_width"], r["image_height"])
        tmp = path + ".tile.png"
        points_lib.draw_points(e["image"], parsed.points, tmp, true_points=r["points"], radius=3)
        tile = Image.open(tmp).convert("RGB")
        tiles.append(tile.resize((tile.width * scale, tile.height * scale)))
        os.remove(tmp)
    if not tiles:
        return None
    cols = min(4, len(tiles))
    grid = Image.new("RGB", (cols * tiles[0].width, -(-len(tiles) // cols) * tiles[0].height), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * tile.width, (i // cols) * tile.height))
    grid.save(path)
    return path


def export_and_reload(stage_dir, export_dir, model, batch_inputs, tokenizer_dir):
    """Export the final checkpoint (and its tokenizer) to the released HF layout, load it back,
    compare logits."""
    import jax.numpy as jnp

    from molmo_jax import weights

    weights.export_checkpoint(stage_dir, export_dir, tokenizer=tokenizer_dir, overwrite=True)
    _, reloaded = weights.load(export_dir)
    args = [jnp.asarray(batch_inputs[k]) for k in ("input_ids", "images", "image_masks", "image_input_idx")]
    a, b = model(*args)["logits"], reloaded(*args)["logits"]
    return float(jnp.max(jnp.abs(a - b)))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (for tests)")
    parser.add_argument("--eval-examples", type=int, default=None, help="test examples per task")
    parser.add_argument("--seed", type=int, default=0,
                        help="added to the model and data-order seeds (0 = the shipped run; same data)")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)

    from input_pipeline import datasets, synthetic_options, synthetic_split_sizes, tokenizer_dir
    from molmo_jax import models as model_lib
    from molmo_jax.preprocess import Collator, MolmoTokenizer, Preprocessor

    t0 = time.time()
    rate = matmul_rate()
    estimate = "" if args.quick else f"; the demo should take about {estimated_seconds(rate) / 60:.0f} min here"
    print(f"this CPU: {rate:.0f} GFLOP/s (jax float32 2048^3 matmul){estimate}", file=sys.stderr)
    workdir = args.workdir
    os.makedirs(workdir, exist_ok=True)
    (n1, c1), (n2, c2) = configs(workdir, args.quick, args.seed)
    n_eval = args.eval_examples or (4 if args.quick else 100)
    print(f"[1/6] synthetic PixMo in {c1.data.data_dir}", file=sys.stderr)
    datasets.ensure_synthetic(c1.data.data_dir, synthetic_split_sizes(c1), synthetic_options(c1))
    tokenizer = MolmoTokenizer(tokenizer_dir(c2), c2.model.llm.vocab_size)

    print("[2/6] evaluating the untrained model", file=sys.stderr)
    untrained = model_lib.create_model(c2.model, seed=c2.seed)
    _, _, before = evaluate(untrained, tokenizer, c2, n_eval, "eval (untrained)")
    loss_before = caption_loss(untrained, c1)

    print("[3/6] stage 1: caption pretraining", file=sys.stderr)
    t1 = train(n1, c1, workdir)
    print("[4/6] stage 2: multitask fine-tuning", file=sys.stderr)
    t2 = train(n2, c2, workdir, init_params=t1.params)

    print("[5/6] evaluating the trained model", file=sys.stderr)
    trained = t2.model()
    examples, rows, after = evaluate(trained, tokenizer, c2, n_eval, "eval (trained)")
    loss_after = caption_loss(trained, c1)
    with open(os.path.join(workdir, "predictions.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    grid = draw_grid(rows, [e for e in examples], os.path.join(workdir, "points.png"))

    print("[6/6] exporting to the Hugging Face layout and reloading", file=sys.stderr)
    pre = Preprocessor(c2.model, tokenizer)
    sample = Collator()([pre(examples[0], for_inference=True)])
    export_dir = os.path.join(workdir, "export_hf")
    logits_diff = export_and_reload(os.path.join(workdir, n2), export_dir, trained, sample, tokenizer_dir(c2))

    report = dict(
        pointing_f1=after["pointing"]["f1"], counting_accuracy=after["counting"]["accuracy"],
        qa_accuracy=after["exact"]["accuracy"], caption_loss=loss_after,
        untrained_pointing_f1=before["pointing"]["f1"], untrained_counting_accuracy=before["counting"]["accuracy"],
        untrained_qa_accuracy=before["exact"]["accuracy"], untrained_caption_loss=loss_before,
        export_max_abs_logit_diff=logits_diff, steps={"stage1": int(t1.step), "stage2": int(t2.step)},
        eval_examples_per_task=n_eval, seed_offset=args.seed, parameters=model_lib.count_params(trained),
        wall_seconds=time.time() - t0, quick=args.quick, matmul_gflops=rate,
        estimated_wall_seconds=estimated_seconds(rate))
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = ["# molmo_jax demo report", "", "| metric | untrained | trained |", "|---|---|---|"]
    for key in ("pointing_f1", "counting_accuracy", "qa_accuracy", "caption_loss"):
        md.append(f"| {key} | {report['untrained_' + key]:.3f} | {report[key]:.3f} |")
    md += ["", f"steps: stage 1 {t1.step}, stage 2 {t2.step}; {n_eval} test examples per task; "
               f"export logits max abs diff {logits_diff:.2e}; {report['wall_seconds']:.0f} s"]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nartefacts: {workdir}/report.json, report.md, predictions.jsonl"
          + (f", {grid}" if grid else "") + f"; checkpoints and TensorBoard logs in {workdir}/{n1}, "
          f"{workdir}/{n2}; Hugging Face export in {export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
