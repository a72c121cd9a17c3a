"""Train the demo model's tokenizer (bundled as molmo_jax/assets/demo_tokenizer).

    python -m tools.build_demo_tokenizer [--data-dir runs/demo/data] [--out DIR] [--vocab-size 1024]

A byte-level BPE (same pre-tokenizer and decoder as the tiny tokenizer) trained on the text the demo
model reads: the stage-1 and stage-2 training sequences of configs/demo_*.py, formatted by the real
loaders and decoded back to text. Why the demo needs its own: the tiny tokenizer has 128 merges and
spells most words letter by letter ("purple stars" is 9 tokens, a point's "x1=\"12.5\"" 8), so the
demo's 4-layer LLM had to assemble words before it could look for them in the image. With whole
words the sequences are 0.43x as long (the demo runs ~35% faster) and colour questions went from
chance to 8-11 of 13 right; pointing was not measurably more reliable (docs/benchmarks.md#how-the-config-was-found).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "molmo_jax", "assets", "demo_tokenizer")
EOS = "<|endoftext|>"


def training_texts(data_dir: str, batches: int = 60) -> list[str]:
    """Runs of ordinary tokens (no image tokens, no EOS) of the demo's training batches, as text."""
    import numpy as np

    import input_pipeline
    from configs import demo_pretrain, demo_sft
    from molmo_jax.preprocess import MolmoTokenizer

    texts = []
    for module in (demo_pretrain, demo_sft):
        c = module.get_config()
        c.data.data_dir = data_dir
        c.data.tokenizer = input_pipeline.TINY_TOKENIZER   # any tokenizer works: its text is decoded
        c.model.llm.update(vocab_size=512, embedding_size=512)
        c.seq_len = 2 * c.seq_len                         # nothing truncated
        tok = MolmoTokenizer(c.data.tokenizer, c.model.llm.vocab_size)
        for batch in itertools.islice(input_pipeline.make_loader(c), batches):
            for row in np.asarray(batch["input_ids"]):
                run: list[int] = []
                for t in list(row) + [-1]:
                    if 0 <= t < tok.base_size and t != tok.eos_id:
                        run.append(int(t))
                    elif run:
                        texts.append(tok.decode(run, truncate_at_eos=False))
                        run = []
    return texts


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.build_demo_tokenizer",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="runs/demo/data", help="synthetic PixMo folder (built if absent)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--vocab-size", type=int, default=1024, help="at most this many tokens (EOS included)")
    parser.add_argument("--batches", type=int, default=60, help="training batches read per stage")
    args = parser.parse_args(argv)
    from configs import demo_pretrain

    model_vocab = demo_pretrain.get_config().model.llm.vocab_size
    if not 257 < args.vocab_size <= model_vocab:  # 256 bytes + EOS; the demo model pads up to its vocab
        parser.error(f"--vocab-size {args.vocab_size}: must be above 257 (the 256 bytes and EOS) and at "
                     f"most the demo model's vocab_size {model_vocab} (molmo_jax/config.py demo())")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from input_pipeline import datasets, synthetic_options, synthetic_split_sizes

    c = demo_pretrain.get_config()
    datasets.ensure_synthetic(args.data_dir, synthetic_split_sizes(c), synthetic_options(c))
    texts = training_texts(args.data_dir, args.batches)
    tok = train_tokenizer(texts, args.vocab_size)
    os.makedirs(args.out, exist_ok=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": None,
                   "add_bos_token": False, "add_eos_token": False}, f, indent=1)
    print(f"{args.out}: {tok.get_vocab_size()} tokens from {len(texts)} texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
