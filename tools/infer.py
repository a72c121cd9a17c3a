"""Ask a Molmo or Molmo2 checkpoint about images: one question, a JSONL batch, or golden-style parity inputs.

    python -m tools.infer --checkpoint PATH --image FILE --prompt TEXT [--out-image points.png] [--json]
    python -m tools.infer --checkpoint MOLMO2 --image A --image B --prompt TEXT     several images (Molmo2)
    python -m tools.infer --checkpoint MOLMO2 --video FRAMES_DIR [--fps 2] --prompt TEXT   a video (Molmo2)
    python -m tools.infer --checkpoint PATH --batch requests.jsonl --out answers.jsonl
    python -m tools.infer --checkpoint PATH --inputs INPUTS.npz --max-new-tokens 16 --out OUT.npz

PATH: a molmo_jax model directory, a training run (or one step directory of it), or a PyTorch
directory (original / released HF form, converted on the fly). The tokenizer comes from the
checkpoint (`tokenizer/`, or a tokenizer.json next to the weights) or `--tokenizer DIR`.
A Molmo2 video is a folder of frames (image files, in name order; no video decoder is a dependency) shot
at `--fps` frames per second (default: the processor's sampling rate); its points and tracks are
reported per frame time, and `--out-image OUT.png` draws every image or frame with points as
OUT_000.png, OUT_001.png, ... (one image: OUT.png itself).
Batch records are JSON objects {"image": path, "prompt": text} (Molmo2: "image" may be a list of
paths, or "video": a folder of frames with an optional "fps"); relative paths are read relative to
the JSONL file; a Molmo2 answers its records one at a time. Each record gets one output line, in order; a record that cannot be answered
(bad line, missing or unreadable image, prompt too long) gets {"line", "error"} instead and the batch goes
on (exit status 1 when any failed). `--inputs` decodes pre-made model inputs (input_ids, images, image_masks,
image_input_idx) and writes greedy_tokens and greedy_step_logits, for parity checks.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

from tools.forward import read_inputs

DEFAULT_MAX_NEW_TOKENS = 200  # = molmo_jax.inference.DEFAULT_MAX_NEW_TOKENS (not imported: keeps --help fast)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tools.infer", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="model directory, training run, or PyTorch directory")
    p.add_argument("--tokenizer", help="tokenizer folder (when the checkpoint has none)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--image", action="append", help="image file (with --prompt); Molmo2: repeat for several")
    mode.add_argument("--video", help="Molmo2: a folder of video frames (with --prompt)")
    mode.add_argument("--batch", help="JSONL file of {\"image\", \"prompt\"} records (with --out)")
    mode.add_argument("--inputs", help="golden-style inputs .npz (with --out): parity decode")
    p.add_argument("--prompt", help="the question")
    p.add_argument("--out", help="answers .jsonl (--batch) or outputs .npz (--inputs)")
    p.add_argument("--out-image", help="write the image with the answer's points drawn (PNG)")
    p.add_argument("--fps", type=float, default=None, help="Molmo2 --video: frames per second of the frames")
    p.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: 200 (16 with --inputs, the golden decode length)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=0.0, help="beam search: score / length ** this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    p.add_argument("--style", default="demo", help="prompt style; 'demo' = no prefix, e.g. 'vqa2' adds 'vqa2:'")
    p.add_argument("--max-crops", type=int, default=None, help="image crops (default: the model's)")
    p.add_argument("--weights", default=None, metavar="float|int8|int4[:GROUP][+head]",
                   help="quantize the LLM's weights after loading (int4 groups of GROUP inputs, default 128; +head: the output head too)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together in --batch mode")
    args = p.parse_args(argv)
    if (args.image is not None or args.video is not None) and not args.prompt:
        p.error("--image and --video need --prompt")
    if (args.batch or args.inputs) and not args.out:
        p.error("--batch and --inputs need --out")
    if args.out_image and not (args.image or args.video):
        p.error("--out-image goes with --image or --video")
    if args.fps is not None and not args.video:
        p.error("--fps goes with --video")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size),
                        ("--max-crops", args.max_crops), ("--beam-size", args.beam_size), ("--fps", args.fps)):
        if value is not None and value <= 0:
            p.error(f"{flag} must be positive, got {value:g}")
    return args


def sampling_kwargs(args, default_max_new_tokens):
    return dict(max_new_tokens=args.max_new_tokens or default_max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, beam_size=args.beam_size, length_penalty=args.length_penalty,
                seed=args.seed, stop_strings=tuple(args.stop))


def _media_problem(rec: dict, molmo2: bool) -> str | None:
    """What is wrong with a record's fields, or None. Molmo: "image" (a path). Molmo2: "image" (a path or a
    list of paths) or "video" (a folder of frames, with an optional "fps")."""
    if not isinstance(rec.get("prompt"), str):
        return 'expected a string field "prompt"'
    image, video = rec.get("image"), rec.get("video")
    if not molmo2:
        return None if isinstance(image, str) and video is None else 'expected a string field "image" (a path)'
    if (image is None) == (video is None):
        return 'expected "image" (a path or a list of paths) or "video" (a folder of frames), one of them'
    if video is not None:
        fps = rec.get("fps")
        if not isinstance(video, str) or (fps is not None and (not isinstance(fps, (int, float)) or fps <= 0)):
            return '"video" must be a folder path and "fps" a positive number'
        return None
    if isinstance(image, str) or (isinstance(image, list) and image and all(isinstance(i, str) for i in image)):
        return None
    return '"image" must be a path or a non-empty list of paths'


def read_requests(path, molmo2: bool = False) -> list:
    """The records of a JSONL file, in order: dicts with "line" and their paths resolved, and for a line
    that cannot be used (not JSON, not UTF-8, missing fields, image not found) a `Failed` naming the line."""
    from molmo_jax.inference import Failed

    from molmo_jax import jsonl

    path = pathlib.Path(path)
    try:
        lines = list(jsonl.records(path))
    except FileNotFoundError:
        raise SystemExit(f"error: {path}: no such file")
    except OSError as e:
        raise SystemExit(f"error: {path}: cannot be read ({e.strerror or e})")
    out = []
    for number, rec in lines:
        where = f"{path}:{number}"
        if isinstance(rec, str):
            out.append(Failed(f"{where}: {rec}", line=number))
            continue
        problem = _media_problem(rec, molmo2)
        if problem:
            out.append(Failed(f"{where}: {problem}, got {json.dumps(rec)[:80]}", line=number))
            continue
        resolved = {}
        for key in ("image", "video"):
            if key in rec:
                names = [rec[key]] if isinstance(rec[key], str) else rec[key]
                found = [p if p.is_absolute() else path.parent / p for p in map(pathlib.Path, names)]
                missing = [str(p) for p in found if not (p.is_dir() if key == "video" else p.is_file())]
                if missing:
                    problem = f"{key} {missing[0]} not found"
                    break
                resolved[key] = [str(p) for p in found] if isinstance(rec[key], list) else str(found[0])
        if problem:
            out.append(Failed(f"{where}: {problem}", rec["prompt"], number))
            continue
        out.append(dict(rec, **resolved, line=number))
    if not out:
        raise SystemExit(f"error: {path}: no records")
    return out


def load_answerer(args, mesh=None):
    from molmo_jax.inference import Answerer
    from molmo_jax.preprocess import TokenizerError
    from molmo_jax.weights import WeightsError

    try:
        return Answerer.load(args.checkpoint, args.tokenizer, mesh=mesh, weights_kind=args.weights,
                             max_crops=args.max_crops, style=args.style)
    except (WeightsError, TokenizerError) as e:
        raise SystemExit(f"error: {e}")


def checkpoint_family(args) -> str:
    from molmo_jax import weights
    from molmo_jax.models import family_of

    try:
        return family_of(weights.load_config(args.checkpoint))
    except (weights.WeightsError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def run_single(args):
    from molmo_jax import points as points_lib
    from molmo_jax.preprocess import ImageError

    for image in args.image or ():
        if not os.path.isfile(image):
            raise SystemExit(f"error: {image}: image not found")
    if checkpoint_family(args) == "molmo2":
        return run_molmo2(args)
    if args.video or len(args.image) > 1:
        raise SystemExit(f"error: {args.checkpoint} is a Molmo: it takes one --image (several images and "
                         "--video are Molmo2's)")
    args.image = args.image[0]
    answerer = load_answerer(args)
    try:
        answer = answerer.ask(args.image, args.prompt, **sampling_kwargs(args, DEFAULT_MAX_NEW_TOKENS))
    except ImageError as e:
        raise SystemExit(f"error: {e}")
    # The answer is printed before anything is drawn: a failure to draw never loses it.
    if args.json:
        print(json.dumps(answer.to_json()), flush=True)
    else:
        print(answer.text)
        if len(answer.points_px):
            print("points (x, y px): " + ", ".join(f"({x:.1f}, {y:.1f})" for x, y in answer.points_px))
        if answer.count is not None:
            print(f"count: {answer.count}", flush=True)
    if args.out_image:
        points_lib.draw_points(args.image, answer.points_px, args.out_image)
        if not args.json:
            print(f"wrote {args.out_image} ({len(answer.points_px)} points drawn)")


def video_frames(folder) -> list[str]:
    """The frame files of a --video folder, in name order."""
    from molmo_jax.preprocess.image_io import frame_files

    try:
        return frame_files(folder)
    except ValueError as e:
        raise SystemExit(f"error: --video {e}") from None


def run_molmo2(args):
    """One prompt about images or a video, for a Molmo2 checkpoint."""
    from molmo_jax import points as points_lib
    from molmo_jax import weights
    from molmo_jax.inference_molmo2 import Molmo2Answerer
    from molmo_jax.molmo2_points import draw_molmo2_points
    from molmo_jax.preprocess import ImageError, TokenizerError
    from molmo_jax.preprocess.image_io import frame_files, load_image

    check_molmo2_options(args)
    frames = video_frames(args.video) if args.video else None
    try:
        answerer = Molmo2Answerer.load(args.checkpoint, args.tokenizer, weights_kind=args.weights)
        media = [load_image(f) for f in (frames or args.image)]
        answer = answerer.ask(args.prompt, images=() if frames else media, video=media if frames else None,
                              fps=args.fps, **sampling_kwargs(args, DEFAULT_MAX_NEW_TOKENS))
    except (weights.WeightsError, TokenizerError, ImageError) as e:
        raise SystemExit(f"error: {e}")
    # The answer is printed before anything is drawn: a failure to draw never loses it.
    if args.json:
        print(json.dumps(answer.to_json()), flush=True)
    else:
        print(answer.text)
        p = answer.points
        where = "t={:.1f}s" if frames else "image {:.0f}"
        for (x, y), f, i in zip(p.points, p.frames, p.ids):
            print(f"point {i} ({where.format(f)}): ({x:.1f}, {y:.1f}) px")
        if answer.count is not None:
            print(f"count: {answer.count}", flush=True)
    if args.out_image:
        out = pathlib.Path(args.out_image)
        if len(media) == 1 and not frames:
            paths = [points_lib.draw_points(media[0], answer.points.points, str(out))]
        else:  # a video's points are drawn on the frames the model saw, by their times
            shown = [media[i] for i in answer.frame_indices] if frames else media
            paths = draw_molmo2_points(shown, answer.points, str(out.parent), prefix=out.stem,
                                       timestamps=answer.timestamps if frames else None)
        if not args.json:
            print(f"wrote {', '.join(paths) or 'nothing (no points)'}")


def run_batch(args):
    """Answers one line per record, in order; a record that cannot be answered gets {"line", "error"} in
    its place and the rest go on. Exit status 1 when any record failed (after writing all of them)."""
    from tqdm import tqdm

    from molmo_jax.inference import Failed

    molmo2 = checkpoint_family(args) == "molmo2"
    requests = read_requests(args.batch, molmo2)
    answer_all = molmo2_batch(args) if molmo2 else load_answerer(args).ask_many
    bar = tqdm(total=len(requests), unit="prompt", file=sys.stderr)
    t0 = time.perf_counter()
    partial = f"{args.out}.partial"  # an existing --out stays as it was until the batch is done
    with open(partial, "w") as f:
        lines = iter(r["line"] if isinstance(r, dict) else r.line for r in requests)

        def write(answers):
            for a in answers:
                f.write(json.dumps(dict(a.to_json(), line=next(lines))) + "\n")
            f.flush()
            bar.update(len(answers))
        answers = answer_all(requests, batch_size=args.batch_size, progress=write, keep_going=True,
                             **sampling_kwargs(args, DEFAULT_MAX_NEW_TOKENS))
    os.replace(partial, args.out)
    bar.close()
    seconds = time.perf_counter() - t0
    failed = [a for a in answers if isinstance(a, Failed)]
    n_tokens = sum(len(a.tokens) for a in answers if not isinstance(a, Failed))
    print(f"{len(answers) - len(failed)} answers -> {args.out}; {n_tokens} tokens in {seconds:.1f}s = "
          f"{n_tokens / seconds:.1f} tokens/s (incl. preprocessing and compilation)")
    for a in failed:
        print(f"error: {a.error}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(answers)} records failed; their lines in {args.out} hold \"error\"",
              file=sys.stderr)
        return 1
    return 0


def molmo2_batch(args):
    """A Molmo2 checkpoint's answers to batch records, one record at a time (records differ in their
    number of images and frames), with the same progress and keep-going contract as Answerer.ask_many."""
    from molmo_jax import weights
    from molmo_jax.inference import Failed
    from molmo_jax.inference_molmo2 import Molmo2Answerer
    from molmo_jax.preprocess import TokenizerError
    from molmo_jax.preprocess.image_io import frame_files, load_image

    check_molmo2_options(args)
    try:
        answerer = Molmo2Answerer.load(args.checkpoint, args.tokenizer, weights_kind=args.weights)
    except (weights.WeightsError, TokenizerError) as e:
        raise SystemExit(f"error: {e}")

    def answer_all(requests, *, batch_size, progress, keep_going, **sampling):
        del batch_size, keep_going
        answers = []
        for r in requests:
            if not isinstance(r, Failed):
                try:
                    if "video" in r:
                        frames = [load_image(f) for f in frame_files(r["video"])]
                        answer = answerer.ask(r["prompt"], video=frames, fps=r.get("fps"), **sampling)
                    else:
                        images = [r["image"]] if isinstance(r["image"], str) else r["image"]
                        answer = answerer.ask(r["prompt"], images=[load_image(i) for i in images], **sampling)
                except ValueError as e:  # ImageError, too long, an empty frames folder
                    r = Failed(str(e), r["prompt"], r["line"])
                else:
                    r = answer
            answers.append(r)
            progress([r])
        return answers
    return answer_all


def check_molmo2_options(args):
    if args.max_crops is not None or args.style != "demo":
        raise SystemExit("error: --max-crops and --style are Molmo's; a Molmo2 uses its config's crops and "
                         "its chat template")


def run_inputs(args):
    """Parity decode: golden-style inputs -> greedy_tokens, greedy_step_logits ([N], [N, V] for one row)."""
    from molmo_jax import generate as gen_lib
    from molmo_jax import weights
    from molmo_jax.inference import NoTokenizerError, find_tokenizer
    from molmo_jax.preprocess import MolmoTokenizer, TokenizerError
    from molmo_jax.weights import WeightsError

    data = read_inputs(args.inputs)
    try:
        cfg, model = weights.load(args.checkpoint, quantize=args.weights)
        try:  # EOS from the tokenizer when there is one; else the config's, when it names a real token
            eos = MolmoTokenizer(str(find_tokenizer(args.checkpoint, args.tokenizer)), cfg.llm.vocab_size).eos_id
            eos_from = "the tokenizer"
        except NoTokenizerError:
            eos, eos_from = cfg.llm.eos_token_id, "the config; no tokenizer"
            if not 0 <= eos < cfg.llm.vocab_size:  # an id the model cannot produce: every row runs to the end
                eos_from = (f"the config, outside the vocabulary of {cfg.llm.vocab_size}: no end of text, decoding "
                            f"runs to --max-new-tokens; give --tokenizer DIR for the real one")
    except (WeightsError, TokenizerError) as e:
        raise SystemExit(f"error: {e}")
    sampling = gen_lib.Sampling(**sampling_kwargs(args, 16))
    gen = gen_lib.Generator(model, eos)
    t0 = time.perf_counter()
    out = gen({k: data[k] for k in gen_lib.MODEL_INPUTS}, sampling, return_logits=sampling.beam_size == 1)
    n = int(out["lengths"].max())
    result = {"greedy_tokens": out["tokens"][:, :n], "scores": out["scores"].astype(np.float32)}
    if "step_logits" in out:
        result["greedy_step_logits"] = out["step_logits"][:, :n]
    if len(out["tokens"]) == 1:  # one prompt: the golden expected.npz layout
        result = {k: v[0] for k, v in result.items()}
    np.savez(args.out, **result)
    print(f"{cfg.name}: {out['tokens'].shape[0]} prompt(s), {n} tokens (EOS {eos} from {eos_from}) in "
          f"{time.perf_counter() - t0:.1f}s; wrote {args.out}")


def check_outputs(args):
    """Every output path is writable before any work: its folder exists and accepts files."""
    for flag, path in (("--out", args.out), ("--out-image", args.out_image)):
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise SystemExit(f"error: {flag} {path}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise SystemExit(f"error: {flag} {path}: folder {folder} is not writable")
        if os.path.isdir(path):
            raise SystemExit(f"error: {flag} {path}: is a directory")


def main(argv=None):
    args = parse_args(argv)
    check_outputs(args)
    try:
        from molmo_jax.generate import Sampling
        from molmo_jax.layers import quant
        Sampling(**sampling_kwargs(args, DEFAULT_MAX_NEW_TOKENS))  # bad settings fail before the model loads
        if args.weights:
            quant.parse(args.weights)
        if args.inputs:
            run_inputs(args)
        elif args.batch:
            return run_batch(args)
        else:
            run_single(args)
    except ValueError as e:  # bad sampling settings, shapes: one line, not a traceback
        raise SystemExit(f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
