"""Example (data contract) -> model arrays for one batch slot: the whole preprocessing of one example.

    pre = Preprocessor(cfg, MolmoTokenizer(tokenizer_dir, cfg.llm.vocab_size))
    ex = pre({"image": path_or_array, "message_list": [{"style": "demo", "question": "..."}]},
             for_inference=True)
    # ex: input_ids, target_tokens, loss_masks, position_ids[, subsegment_ids], images,
    #     image_masks, image_input_idx (unbatched; see collate.Collator), tiling, metadata

Random choices (conversation order, prompt templates, answer ties, 10% style prefixes, length
hints) use the `rng` given, or `np.random.default_rng(seed)`; `example_seed` gives the original's
per-example seed (seed + index + dataset_len * epoch).
"""
from __future__ import annotations

import numpy as np

from molmo_jax.preprocess import formatting, image as image_lib, sequence
from molmo_jax.preprocess.image_io import DEFAULT_MAX_PIXELS, load_image


def example_seed(seed: int, index: int, dataset_len: int, epoch: int = 0) -> int:
    return int(seed) + int(index) + int(dataset_len) * int(epoch)


class Preprocessor:
    def __init__(self, cfg, tokenizer, format_settings: formatting.FormatSettings | None = None,
                 max_crops: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        if tokenizer.vocab_size != cfg.llm.vocab_size:
            raise ValueError(f"tokenizer padded to {tokenizer.vocab_size} tokens but cfg.llm.vocab_size is "
                             f"{cfg.llm.vocab_size}: the image token ids would disagree")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.format = format_settings or formatting.FormatSettings()
        self.image_settings = image_lib.ImageSettings.from_config(cfg, max_crops=max_crops)
        self.max_pixels = max_pixels

    def process_image(self, source) -> image_lib.ImageInputs:
        return image_lib.process_image(load_image(source, self.max_pixels), self.image_settings)

    def format_messages(self, example: dict, rng: np.random.Generator, for_inference: bool,
                        image_size=None) -> list[list[str]]:
        """Formatted message strings of every conversation (shuffled for training, docs/architecture.md#packing)."""
        convs = example.get("message_list")
        if not isinstance(convs, (list, tuple)) or not convs:
            raise formatting.FormatError(f"example needs a non-empty 'message_list' (keys: {sorted(example)})")
        convs = list(convs)
        if for_inference and len(convs) > 1:
            raise formatting.FormatError(f"the inference format takes one conversation, got {len(convs)}")
        if len(convs) > 1:
            convs = [convs[i] for i in rng.permutation(len(convs))]
        return [formatting.format_conversation(c, rng, self.format, for_inference, image_size) for c in convs]

    def __call__(self, example: dict, rng: np.random.Generator | None = None, *, for_inference: bool = False,
                 seed: int = 0) -> dict:
        if rng is None:
            rng = np.random.default_rng(seed)
        if isinstance(example.get("image"), (list, tuple)) or example.get("video") is not None:
            raise formatting.FormatError("a record of several images or a video: a Molmo takes one image "
                                         "(a Molmo2 takes these)")
        images = []
        image_size = None
        if example.get("image") is not None:
            pixels = load_image(example["image"], self.max_pixels)
            image_size = (pixels.shape[1], pixels.shape[0])
            images.append(image_lib.process_image(pixels, self.image_settings))
        messages = self.format_messages(example, rng, for_inference, image_size)
        weight = example.get("weight")
        if weight is not None and len(messages) > 1:
            raise formatting.FormatError("an example weight cannot be combined with several conversations")
        w = 1.0 if weight is None else float(weight)
        convs = [sequence.tokenize_messages(self.tokenizer, m, w) for m in messages]
        out = sequence.assemble(
            convs, images, bos_id=self.tokenizer.bos_id, image_prompt_id=self.tokenizer.image,
            for_inference=for_inference,
            root_subsegments=self.format.multi_annotation_weighting == "root_subsegments")
        if images:
            out["tiling"] = np.array(images[0].tiling, np.int32)
        out["metadata"] = dict(example.get("metadata") or {}, messages=messages)
        if image_size is not None:
            out["metadata"].setdefault("image_size", image_size)
        return out
