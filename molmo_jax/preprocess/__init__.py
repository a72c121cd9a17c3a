"""Molmo preprocessing in plain numpy (no JAX, no torch): images, text, packing, collation.

    from molmo_jax.preprocess import MolmoTokenizer, Preprocessor, Collator
    tok = MolmoTokenizer(tokenizer_dir, cfg.llm.vocab_size)
    pre = Preprocessor(cfg, tok)
    batch = Collator.from_config(cfg, 2304)([pre(ex, rng) for ex, rng in ...])

Molmo2 (transformers' Molmo2Processor in numpy):
    from molmo_jax.preprocess import Molmo2Processor
    inputs = Molmo2Processor.from_pretrained(checkpoint_dir).apply_chat_template(messages, add_generation_prompt=True,
                                                                                 tokenize=True)
"""
from molmo_jax.preprocess.collate import Collator, default_seq_buckets
from molmo_jax.preprocess.formatting import FormatError, FormatSettings, format_conversation
from molmo_jax.preprocess.image import ImageInputs, ImageSettings, process_image, select_tiling
from molmo_jax.preprocess.image_io import DEFAULT_MAX_PIXELS, ImageError, load_image
from molmo_jax.preprocess.molmo2_chat import format_chat
from molmo_jax.preprocess.molmo2_image import Molmo2ImageSettings
from molmo_jax.preprocess.molmo2_processor import Molmo2Processor, Molmo2Tokenizer
from molmo_jax.preprocess.molmo2_video import Molmo2VideoSettings
from molmo_jax.preprocess.preprocessor import Preprocessor, example_seed
from molmo_jax.preprocess.sequence import IMAGE_SUBSEGMENT, SequenceError, assemble, truncate_example
from molmo_jax.preprocess.tokenizer import MolmoTokenizer, TokenizerError

__all__ = [
    "Collator", "default_seq_buckets", "FormatError", "FormatSettings", "format_conversation",
    "ImageInputs", "ImageSettings", "process_image", "select_tiling", "DEFAULT_MAX_PIXELS", "ImageError",
    "load_image", "Preprocessor", "example_seed", "IMAGE_SUBSEGMENT", "SequenceError", "assemble",
    "truncate_example", "MolmoTokenizer", "TokenizerError", "format_chat", "Molmo2ImageSettings", "Molmo2Processor",
    "Molmo2Tokenizer", "Molmo2VideoSettings",
]
