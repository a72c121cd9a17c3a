"""Evaluation command line.

    python -m tools.eval score --task TASK --predictions FILE.jsonl [--json]

scores predictions made anywhere (this project, the original, vLLM). Each line of FILE.jsonl is a
JSON object with `prediction` (the generated text) and the ground truth of the task:

    vqa, vqa_plain, anls,       "answers": [str, ...] (vqa_plain: A-OKVQA direct answer, lower-cased
    relaxed, exact, clock       strings without the VQA normalisation; exact: one reference is enough
                                for a 1, as in the synthetic QA, where VQA accuracy would give 1/3)
    mc                          "answers": [str | int, ...] (option text, letter or 0-based index),
                                optional "options": [str, ...]; without options: exact match
    counting                    "count": int
    pointing                    "points": [[x, y], ...] in pixels, "image_width", "image_height",
                                optional "mask": one [x, y, w, h] box / RLE per point

It prints a table, or with --json one JSON object (keys `accuracy`, `anls`, `precision`/`recall`/
`f1`, ... and `n`). Bad input exits with status 2 and a one-line error naming the file and line.

    python -m tools.eval --checkpoint PATH --dataset NAME[:split] [--mesh data=1,fsdp=-1] [--out DIR]

runs a checkpoint over a dataset with batched greedy decoding and writes DIR/predictions.jsonl (one row
per question: the prediction and its ground truth, in the fields above, so `score` can re-score it) and
DIR/metrics.json. NAME: a synthetic task (built on the fly), a dataset built with `tools.build_data`
(PixMo points/count/docs/clocks, the academic VQA-style sets, `vqa:<name>`); the metric follows the
dataset (docs/architecture.md#metrics, table in input_pipeline/evaluation.py), --metric overrides it. --mesh loads the
parameters sharded over a device mesh (molmo_jax.sharding) and splits each batch over its batch axes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from molmo_jax.metrics import tasks


class InputError(Exception):
    """A problem with the user's input; reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------
# Reading and checking prediction files

def read_jsonl(path: str) -> list[tuple[str, dict]]:
    """(location "FILE:LINE", object) for every non-blank line."""
    from molmo_jax import jsonl

    try:
        rows = [(f"{path}:{number}", obj) for number, obj in jsonl.records(path)]
    except OSError as e:
        raise InputError(f"{path}: cannot read predictions file ({e.strerror or e})") from None
    for where, obj in rows:
        if isinstance(obj, str):
            raise InputError(f"{where}: {obj}")
    if not rows:
        raise InputError(f"{path}: no predictions (the file is empty)")
    return rows


def _field(row: dict, key: str, where: str):
    if key not in row:
        raise InputError(f"{where}: missing field {key!r}")
    return row[key]


def _prediction(row: dict, where: str) -> str:
    pred = _field(row, "prediction", where)
    if not isinstance(pred, str):
        raise InputError(f"{where}: field 'prediction' must be a string, got {type(pred).__name__}")
    return pred


def _answers(row: dict, where: str, allow_int: bool = False) -> list:
    answers = _field(row, "answers", where)
    ok_types = (str, int) if allow_int else (str,)
    if (not isinstance(answers, list) or not answers
            or not all(isinstance(a, ok_types) and not isinstance(a, bool) for a in answers)):
        kinds = "strings or option indices" if allow_int else "strings"
        raise InputError(f"{where}: field 'answers' must be a non-empty list of {kinds}")
    return answers


def _int_field(row: dict, key: str, where: str, minimum: int) -> int:
    value = _field(row, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise InputError(f"{where}: field {key!r} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _points(row: dict, where: str) -> np.ndarray:
    points = _field(row, "points", where)
    if not isinstance(points, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        and math.isfinite(v) for v in p) for p in points):
        raise InputError(f"{where}: field 'points' must be a list of [x, y] pixel pairs")
    return np.array(points, dtype=np.float64).reshape(-1, 2)


# ----------------------------------------------------------------------------------------------
# Scoring: the checked fields of each row through the one task table (molmo_jax.metrics.tasks)

def _truth(task: str, row: dict, where: str) -> dict:
    """The ground-truth fields `task` reads, checked."""
    if task == "pointing":
        return dict(points=_points(row, where), image_width=_int_field(row, "image_width", where, 1),
                    image_height=_int_field(row, "image_height", where, 1), mask=row.get("mask"))
    if task == "counting":
        return dict(count=_int_field(row, "count", where, 0))
    truth = dict(answers=_answers(row, where, allow_int=task == "mc"))
    if task == "mc":
        options = row.get("options")
        if options is not None and (not isinstance(options, list) or not all(isinstance(o, str) for o in options)):
            raise InputError(f"{where}: field 'options' must be a list of strings")
        truth["options"] = options
    return truth


def score_rows(task: str, rows, args) -> dict:
    settings = tasks.ScoreSettings(postprocess=not args.no_postprocess, distance_threshold=args.distance_threshold,
                                   original_units=args.original_units, original_quirks=args.original_quirks)
    predictions, truths, scores = [], [], []
    for where, row in rows:
        predictions.append(_prediction(row, where))
        truths.append(_truth(task, row, where))
        try:
            scores.append(tasks.score(task, predictions[-1], truths[-1], settings))
        except ValueError as e:
            raise InputError(f"{where}: {e}") from None
    return tasks.aggregate(task, scores, predictions, truths, settings)


# ----------------------------------------------------------------------------------------------
# Output

def format_table(task: str, path: str, metrics: dict) -> str:
    lines = [f"task {task}  ({path})", f"{'metric':<20} {'value':>10}"]
    for key, value in metrics.items():
        if key == "n":
            continue
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                lines.append(f"{f'{key}[{sub_key}]':<20} {sub_value:>10.4f}")
        else:
            lines.append(f"{key:<20} {value:>10.4f}")
    lines.append(f"{'n':<20} {metrics['n']:>10d}")
    return "\n".join(lines)


def run_score(args) -> int:
    rows = read_jsonl(args.predictions)
    metrics = score_rows(args.task, rows, args)
    if args.json:
        print(json.dumps(dict(task=args.task, **{k: ({str(kk): vv for kk, vv in v.items()}
                                                     if isinstance(v, dict) else v)
                                                 for k, v in metrics.items()})))
    else:
        print(format_table(args.task, args.predictions, metrics))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.eval", description="Molmo evaluation.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    score = commands.add_parser("score", help="score a JSONL file of predictions",
                                description="Score a JSONL file of predictions (see the module docstring).")
    score.add_argument("--task", required=True, choices=tasks.TASKS)
    score.add_argument("--predictions", required=True, metavar="FILE.jsonl")
    score.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    score.add_argument("--no-postprocess", action="store_true",
                       help="vqa/anls/relaxed/mc/clock: do not apply the answer post-processing (docs/architecture.md#metrics)")
    score.add_argument("--original-quirks", action="store_true",
                       help="counting: parse as the original ('There are none.' is unparsable)")
    score.add_argument("--original-units", action="store_true",
                       help="pointing: match GT percent against predicted pixels, as the original")
    score.add_argument("--distance-threshold", type=float, default=None, metavar="PIXELS",
                       help="pointing without masks: hit radius (default 5%% of the image diagonal)")
    score.set_defaults(func=run_score)
    return parser


def _load(args):
    """(cfg, model, mesh or None) of --checkpoint, sharded over --mesh when given."""
    from molmo_jax import weights
    from molmo_jax.weights import WeightsError

    if args.weights:
        from molmo_jax.layers import quant
        try:
            quant.parse(args.weights)
        except ValueError as e:
            raise InputError(f"--weights: {e}") from None
    mesh = None
    if args.mesh:
        from molmo_jax import sharding
        try:
            mesh = sharding.make_mesh(sharding.parse_mesh(args.mesh))
        except ValueError as e:
            raise InputError(f"--mesh {args.mesh}: {e}") from None
    try:
        cfg, model = weights.load(args.checkpoint, mesh=mesh, quantize=args.weights)
    except (WeightsError, FileNotFoundError, ValueError) as e:
        raise InputError(f"--checkpoint {args.checkpoint}: {e}") from None
    return cfg, model, mesh


def _examples(args) -> list[dict]:
    import collections

    from input_pipeline.evaluation import EvalDataError, make_eval_examples

    name, _, split = args.dataset.partition(":")
    sizes = options = None
    try:
        if args.split_sizes:
            from input_pipeline.builders.base import parse_split_sizes
            sizes = parse_split_sizes(args.split_sizes, ("train", "validation", "test"))
        if args.synthetic_options:
            from input_pipeline.synthetic import parse_options
            options = parse_options(args.synthetic_options)
    except ValueError as e:
        raise InputError(str(e)) from None
    skipped: collections.Counter = collections.Counter()
    try:
        examples = list(make_eval_examples(name, split or None, args.data_dir, limit=args.max_examples,
                                           split_sizes=sizes, options=options, metric=args.metric, skipped=skipped))
    except EvalDataError as e:
        raise InputError(f"--dataset {args.dataset}: {e}") from None
    for reason, n in sorted(skipped.items()):
        print(f"skipped {n}: {reason}", file=sys.stderr)
    if not examples:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        raise InputError(f"--dataset {args.dataset}: no question to evaluate" + (f" (skipped: {why})" if why else ""))
    return examples


def run_checkpoint(args) -> int:
    """Generate over a dataset with a checkpoint and score: predictions.jsonl, metrics.json, images."""
    import os

    from molmo_jax import evaluate
    from molmo_jax.preprocess import Molmo2Tokenizer, MolmoTokenizer, TokenizerError

    examples = _examples(args)  # dataset errors first: they are cheaper to find than loading a model
    cfg, model, mesh = _load(args)
    if mesh is not None:
        split_ways = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
        if args.batch_size % split_ways:  # sharding.spec_for then replicates the batch: correct, slower
            print(f"note: --batch-size {args.batch_size} is not a multiple of the mesh's {split_ways} batch "
                  "shards; every batch is replicated instead of split", file=sys.stderr)
    tok_dir = args.tokenizer or next((d for d in (os.path.join(args.checkpoint, "tokenizer"),)
                                      if os.path.isdir(d)), None)
    if tok_dir is None:
        from input_pipeline import bundled_tokenizer
        tok_dir = bundled_tokenizer(cfg.get("name"))
    if tok_dir is None:
        raise InputError("no tokenizer: the checkpoint has no tokenizer/ folder; pass --tokenizer DIR")
    try:
        if cfg.get("family") == "molmo2":
            tokenizer = Molmo2Tokenizer(str(tok_dir))
        else:
            tokenizer = MolmoTokenizer(tok_dir, cfg.llm.vocab_size)
    except TokenizerError as e:
        raise InputError(f"--tokenizer {tok_dir}: {e}") from None
    settings = evaluate.EvalSettings(batch_size=args.batch_size, max_crops=36 if args.high_res else None,
                                     distance_fraction=args.distance_fraction, mesh=mesh)
    try:
        rows, results = evaluate.run(model, tokenizer, examples, settings)
    except TokenizerError as e:  # a Molmo2 tokenizer whose special tokens are not the model's
        raise InputError(f"--tokenizer {tok_dir}: {e}") from None
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "predictions.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    drawn = 0
    from molmo_jax.molmo2_points import answer_points
    from molmo_jax.points import draw_points
    for row, ex in zip(rows, examples):
        if row["task"] != "pointing" or drawn >= 8:
            continue
        parsed = answer_points(row["prediction"], row["image_width"], row["image_height"])
        draw_points(ex["image"], parsed.points, os.path.join(args.out, f"points_{drawn}.png"),
                    true_points=row["points"])
        drawn += 1
    for task, metrics in results.items():
        print(format_table(task, args.dataset, metrics))
    print(f"wrote {args.out}/predictions.jsonl, metrics.json" + (f" and {drawn} images" if drawn else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--checkpoint", help="generation mode: a checkpoint (molmo_jax, training workdir, "
                                             "or PyTorch directory)")
    parser.add_argument("--dataset", default="synthetic_pointing",
                        help="NAME[:split], e.g. synthetic_counting:test, text_vqa:validation, pixmo_count_counting "
                             "(default split: test, else validation)")
    parser.add_argument("--metric", default=None, choices=tasks.TASKS,
                        help="score a built dataset with this task instead of its own (docs/architecture.md#metrics)")
    parser.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                        help="shard the parameters and batches over a device mesh, e.g. data=1,fsdp=-1,tensor=2 "
                             "(default: one device)")
    parser.add_argument("--weights", default=None, metavar="float|int8|int4[:GROUP][+head]",
                        help="quantize the LLM's weights after loading (int4 groups of GROUP inputs, default 128; +head: the output head too)")
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--high-res", action="store_true", help="36 crops per image (the high-res setting)")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--synthetic-options", default="", help='synthetic data options, e.g. "grid=4,max_objects=4"')
    parser.add_argument("--split-sizes", default="", help='synthetic split sizes, e.g. "train=4000,test=200"')
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--distance-fraction", type=float, default=None,
                        help="pointing: hit within this fraction of the image size (default: masks)")
    parser.add_argument("--out", default="eval_out")
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None and args.checkpoint:
        args.func = run_checkpoint
    if getattr(args, "func", None) is None:
        parser.print_usage(sys.stderr)
        print("error: choose a command (score) or give --checkpoint", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
