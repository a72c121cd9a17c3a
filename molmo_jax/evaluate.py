"""Generation-based evaluation: examples -> batched decoding -> per-example scores -> metrics.

Examples are single-conversation inference examples whose `metadata` carries the ground truth in
the same fields `python -m tools.eval score` reads (`task`, and `points`/`image_width`/
`image_height`, `count`, or `answers` (+ `options` for mc)), e.g. from
`input_pipeline.evaluation.make_eval_examples`. Scores per task are the same numbers `tools.eval score`
computes from the predictions file written from `run`'s rows. A Molmo2 model (`cfg.family == "molmo2"`)
is asked one example at a time through its processor and chat template (`inference_molmo2`), with the
prompt its training writes (`preprocess.molmo2_example.user_prompt`); its `<points coords>` answers are
scored by the same metrics.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

from molmo_jax import generate
from molmo_jax.metrics import tasks
from molmo_jax.preprocess import Collator, Preprocessor


@dataclasses.dataclass
class EvalSettings:
    batch_size: int = 8
    max_new_tokens: int | None = None        # None = per task (metrics.tasks.MAX_NEW_TOKENS)
    distance_fraction: float | None = None   # pointing: hit within this fraction of the image size
                                             # (None: the masks when given, else 5% of the diagonal)
    seq_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)
    max_crops: int | None = None             # e.g. 36 for the high-res setting
    mesh: object = None                      # a jax Mesh: batches split over its batch axes (the
                                             # model's parameters already placed on it)


def score_one(task: str, prediction: str, meta: dict, settings: EvalSettings) -> dict:
    scoring = tasks.ScoreSettings()
    if task == "pointing" and settings.distance_fraction is not None:
        size = max(int(meta["image_width"]), int(meta["image_height"]))
        scoring = tasks.ScoreSettings(distance_threshold=settings.distance_fraction * size, use_masks=False)
    return tasks.score(task, prediction, meta, scoring)


def run(model, tokenizer, examples: Iterable[dict], settings: EvalSettings = EvalSettings(),
        progress=None) -> tuple[list[dict], dict]:
    """Decode greedily and score. Returns (rows for a predictions JSONL, metrics per task).
    `tokenizer`: a MolmoTokenizer, or for a Molmo2 model a Molmo2Tokenizer."""
    answer = (_molmo2_answers if model.cfg.get("family") == "molmo2" else _molmo_answers)(model, tokenizer, settings)
    by_task: dict[str, list[dict]] = {}
    for ex in examples:
        by_task.setdefault(ex["metadata"]["task"], []).append(ex)
    rows, results = [], {}
    for task, exs in by_task.items():
        n_new = settings.max_new_tokens or tasks.MAX_NEW_TOKENS.get(task, 64)
        preds = []
        for start in range(0, len(exs), settings.batch_size):
            chunk = exs[start:start + settings.batch_size]
            preds += answer(chunk, n_new)
            if progress is not None:
                progress(len(chunk))
        metas = [ex["metadata"] for ex in exs]
        scores = [score_one(task, p, m, settings) for p, m in zip(preds, metas)]
        results[task] = tasks.aggregate(task, scores, preds, metas)
        for p, m, s in zip(preds, metas, scores):
            rows.append({"prediction": p, **m, "scores": s})
    return rows, results


def _molmo_answers(model, tokenizer, settings: EvalSettings):
    """(examples, new tokens) -> their answers, decoded as one fixed-shape batch."""
    cfg = model.cfg
    pre = Preprocessor(cfg, tokenizer, max_crops=settings.max_crops)
    crops = 1 + (settings.max_crops or cfg.image.max_crops)
    collate = Collator(seq_buckets=settings.seq_buckets, crop_buckets=(crops,))
    gen = generate.Generator(model, tokenizer.eos_id, mesh=settings.mesh)

    def answer(chunk, n_new):
        inputs = [pre(ex, for_inference=True, seed=int(ex["metadata"].get("seed", 0))) for ex in chunk]
        while len(inputs) < settings.batch_size:  # fixed batch shape: pad with copies, drop later
            inputs.append(inputs[0])
        out = gen(collate(inputs), generate.Sampling(max_new_tokens=n_new))
        return [tokenizer.decode(out["tokens"][i][out["tokens"][i] >= 0]) for i in range(len(chunk))]
    return answer


def _molmo2_answers(model, tokenizer, settings: EvalSettings):
    """(examples, new tokens) -> their answers, one example at a time (examples differ in crops)."""
    import numpy as np

    from molmo_jax.inference_molmo2 import Molmo2Answerer
    from molmo_jax.preprocess import formatting
    from molmo_jax.preprocess.molmo2_example import user_prompt

    answerer = Molmo2Answerer(model.cfg, model, tokenizer, mesh=settings.mesh, max_crops=settings.max_crops)
    fmt = formatting.FormatSettings()

    def answer(chunk, n_new):
        out = []
        for ex in chunk:
            rng = np.random.default_rng(int(ex["metadata"].get("seed", 0)))
            images = [] if ex.get("image") is None else [ex["image"]]
            size = ex["metadata"].get("image_size")
            prompt = user_prompt(ex["message_list"][0], rng, tuple(size) if size else None, fmt)
            out.append(answerer.ask(prompt, images, max_new_tokens=n_new).text)
        return out
    return answer


def mean_loss(model, batches) -> float:
    """Weighted mean token loss (the training loss without z-loss) over model batches."""
    import jax
    from flax import nnx

    from molmo_jax import losses

    graphdef, state = nnx.split(model)

    @jax.jit
    def loss_sums(state, b):
        m = nnx.merge(graphdef, state)
        out = m(**{k: b[k] for k in type(m).INPUTS if b.get(k) is not None})  # the family's inputs by name
        ce, _, w = losses.token_losses(out["logits"], b["target_tokens"], b["loss_masks"])
        return ce.sum(), w.sum()

    total = weight = 0.0
    for b in batches:
        s, w = loss_sums(state, {k: b[k] for k in losses.BATCH_KEYS if k in b})
        total, weight = total + float(s), weight + float(w)
    return total / max(weight, 1e-8)
