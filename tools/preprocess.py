"""Preprocess one image + prompt into model inputs (inference format), saved with the golden names.

    python -m tools.preprocess --model molmo_7b_d --tokenizer DIR --image FILE --prompt TEXT --out OUT.npz
        [--vocab-size N] [--max-crops N] [--style demo]

OUT.npz holds input_ids [T] (int64), images [C, P, 588], image_masks [C, P], image_input_idx
[C, tokens_per_crop] (int32), position_ids [T] and tiling [2] (int64), unbatched like the files of
tests/fixtures/golden/preprocess/. The prompt is formatted as the released models expect
(" User: TEXT Assistant:"; style `demo` adds no style prefix, e.g. `vqa2` would add "vqa2:").
`--vocab-size` overrides the model's vocabulary size (the tokenizer is padded up to it, so the
image tokens sit at vocab_size + 0..4), e.g. to pad a small test tokenizer like the golden files.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tools.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="config preset name, e.g. molmo_7b_d")
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="the user's question or request")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--vocab-size", type=int, default=None, help="pad the tokenizer to this size")
    p.add_argument("--max-crops", type=int, default=None, help="high-res crops (12 released, 36 high-res eval)")
    p.add_argument("--style", default="demo", help="conversation style (decides the style prefix)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from molmo_jax import config as config_lib
    from molmo_jax.preprocess import (FormatError, ImageError, MolmoTokenizer, Preprocessor, SequenceError,
                                      TokenizerError)

    try:
        cfg = config_lib.get_config(args.model)
    except ValueError as e:
        raise SystemExit(f"error: --model: {e}")
    if args.vocab_size is not None:
        if args.vocab_size < 1:
            raise SystemExit("error: --vocab-size must be positive")
        cfg.llm.vocab_size = args.vocab_size
    if args.max_crops is not None and args.max_crops < 1:
        raise SystemExit("error: --max-crops must be >= 1")
    try:
        tok = MolmoTokenizer(args.tokenizer, cfg.llm.vocab_size)
        pre = Preprocessor(cfg, tok, max_crops=args.max_crops)
        ex = pre({"image": args.image, "message_list": [{"style": args.style, "question": args.prompt}]},
                 for_inference=True)
    except (TokenizerError, ImageError, FormatError, SequenceError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    arrays = dict(input_ids=ex["input_ids"].astype(np.int64), images=ex["images"], image_masks=ex["image_masks"],
                  image_input_idx=ex["image_input_idx"], position_ids=ex["position_ids"].astype(np.int64),
                  tiling=ex["tiling"].astype(np.int64))
    try:
        np.savez_compressed(args.out, **arrays)
    except OSError as e:
        raise SystemExit(f"error: cannot write {args.out}: {e}")
    rows, cols = ex["tiling"]
    print(f"{args.out}: {len(ex['input_ids'])} tokens, {len(ex['images'])} crops (tiling {rows}x{cols}), "
          f"text {''.join(ex['metadata']['messages'][0])!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
