"""Molmo2 text + images + videos -> model inputs, equal to transformers' `Molmo2Processor`
(docs/architecture.md#molmo2-preprocessing).

    proc = Molmo2Processor.from_pretrained("path/to/Molmo2-4B")   # tokenizer and processor configs
    messages = [{"role": "user", "content": [{"type": "image", "image": rgb_uint8},
                                             {"type": "text", "text": "Point to the cat."}]}]
    batch = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # batch: dict of numpy arrays under the transformers names: input_ids, attention_mask, mm_token_type_ids
    #        [B, T] int64; pixel_values, image_token_pooling, image_grids, image_num_crops;
    #        pixel_values_videos, video_token_pooling, video_grids

Every prompt gets the BOS string (BOS, else EOS) in front unless it starts with it. Each `<|image|>` /
`<|video|>` marker is replaced by its media's tokens, in order across the batch:
  image  <low_res_im_start> (<im_patch> * low_w <im_col>) * low_h <im_end>
         <im_start> (<im_patch> * high_w <im_col>) * high_h <im_end>
  video  per frame: "{time:.1f} " (a space before all but the first)
         <frame_start> (<im_patch> * cols) * rows <frame_end>
Text is encoded piece by piece between added tokens, as the `tokenizers` library does anyway, so the long
runs of image tokens never go through the tokenizer. Several prompts are right-padded (or left, with
padding_side) with the pad token.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from molmo_jax.preprocess import molmo2_chat
from molmo_jax.preprocess.molmo2_image import Molmo2ImageSettings, process_images
from molmo_jax.preprocess.molmo2_video import Molmo2VideoSettings, process_videos
from molmo_jax.preprocess.tokenizer import TokenizerError, load_tokenizer_file, read_special_names

MOLMO2_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<|image|>", "<im_low>",
                 "<frame_start>", "<frame_end>", "<|video|>")
# Tokens that mark media in mm_token_type_ids (type 1; the processor lists frame tokens as image tokens too).
_MM_TOKENS = ("<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>", "<frame_end>",
              "<im_low>")
_MARKERS = re.compile(f"({re.escape(molmo2_chat.IMAGE_MARKER)}|{re.escape(molmo2_chat.VIDEO_MARKER)})")
_TEXT_OPTIONS = ("image_use_col_tokens", "use_single_crop_col_tokens", "use_single_crop_start_token",
                 "video_use_col_tokens", "use_frame_special_tokens")
_CALL_OPTIONS = ("video_metadata", "do_sample_frames", "num_frames", "fps", "padding_side")


def _check_options(where: str, given: dict, known) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)} (known: {', '.join(known)})")


class Molmo2Tokenizer:
    """A Molmo2 `tokenizer.json` (Qwen3 or OLMo vocabulary with the Molmo2 tokens added) read with the
    `tokenizers` library; BOS / EOS / padding from tokenizer_config.json or special_tokens_map.json."""

    def __init__(self, path: str):
        self._tok, file, folder = load_tokenizer_file(path)
        self.path = file
        missing = [t for t in MOLMO2_TOKENS if self._tok.token_to_id(t) is None]
        if missing:
            raise TokenizerError(f"{file}: not a Molmo2 tokenizer, it lacks {', '.join(missing)}")
        self.ids = {t: self._tok.token_to_id(t) for t in MOLMO2_TOKENS}
        names = read_special_names(folder)
        self.eos_token = names.get("eos_token")
        if self.eos_token is None or self._tok.token_to_id(self.eos_token) is None:
            raise TokenizerError(f"{folder}: no usable eos_token in tokenizer_config.json / special_tokens_map.json")
        self.bos_token = names.get("bos_token") or self.eos_token
        pad = names.get("pad_token")
        self.pad_id = self._tok.token_to_id(pad) if pad else None
        # What the tokenizer's post-processor adds around every text (nothing for Qwen3).
        probe, core = self._tok.encode("a").ids, self._tok.encode("a", add_special_tokens=False).ids
        at = next(i for i in range(len(probe) - len(core) + 1) if probe[i:i + len(core)] == core)
        self._prefix, self._suffix = probe[:at], probe[at + len(core):]

    def __repr__(self):
        return f"Molmo2Tokenizer({self.path!r}, bos={self.bos_token!r}, eos={self.eos_token!r})"

    def encode(self, text: str) -> list[int]:
        """Ids of `text` (added tokens written in it map to their ids), no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(t) for t in np.asarray(ids).reshape(-1) if t >= 0],
                                skip_special_tokens=skip_special_tokens)

    def encode_segments(self, segments) -> list[int]:
        """Ids of a sequence of text pieces (str) and ready token ids (lists), adjacent texts encoded together,
        framed like one encoded text."""
        ids, text = list(self._prefix), []
        for seg in segments + [[]]:
            if isinstance(seg, str):
                text.append(seg)
                continue
            ids += self.encode("".join(text))
            text = []
            ids += seg
        return ids + self._suffix


class Molmo2Processor:
    """Numpy twin of transformers' Molmo2Processor: `tokenizer` is a Molmo2Tokenizer or its directory;
    `image` / `video` hold the image and video processors' options; the keyword options are the
    processor's own (image_use_col_tokens=True, use_single_crop_col_tokens=None (as image_use_col_tokens),
    use_single_crop_start_token=True, video_use_col_tokens=False, use_frame_special_tokens=True)."""

    def __init__(self, tokenizer, image: Molmo2ImageSettings | None = None, video: Molmo2VideoSettings | None = None,
                 **options):
        _check_options("Molmo2Processor", options, _TEXT_OPTIONS)
        self.tokenizer = tokenizer if isinstance(tokenizer, Molmo2Tokenizer) else Molmo2Tokenizer(tokenizer)
        self.image = image or Molmo2ImageSettings()
        self.video = video or Molmo2VideoSettings()
        self.image_use_col_tokens = options.get("image_use_col_tokens", True)
        single = options.get("use_single_crop_col_tokens")
        self.use_single_crop_col_tokens = self.image_use_col_tokens if single is None else single
        self.use_single_crop_start_token = options.get("use_single_crop_start_token", True)
        self.video_use_col_tokens = options.get("video_use_col_tokens", False)
        self.use_frame_special_tokens = options.get("use_frame_special_tokens", True)
        ids = self.tokenizer.ids
        self.mm_token_ids = np.array([ids[t] for t in _MM_TOKENS], np.int64)
        self.video_token_id = ids["<|video|>"]

    @classmethod
    def from_pretrained(cls, folder: str) -> "Molmo2Processor":
        """The processor of a Hugging Face Molmo2 checkpoint folder: its tokenizer files and, when present,
        preprocessor_config.json, video_preprocessor_config.json and processor_config.json."""
        def read(name):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                return {}
            with open(path) as f:
                return json.load(f)

        def view(config, keys):
            size = config.get("size") or {}
            if size.get("height") != size.get("width"):
                raise ValueError(f"{folder}: Molmo2 needs a square size, got {size}")
            renamed = {"crop_size": size.get("height"), "patch": config.get("patch_size"),
                       "pooling": config.get("pooling_size"), "mean": config.get("image_mean"),
                       "std": config.get("image_std"), **{k: config.get(k) for k in keys}}
            return {k: v for k, v in renamed.items() if v is not None}

        image = view(read("preprocessor_config.json"), ("max_crops", "overlap_margins", "rescale_factor"))
        video = view(read("video_preprocessor_config.json"), ("num_frames", "max_fps", "do_sample_frames",
                                                              "rescale_factor"))
        options = {k: v for k, v in read("processor_config.json").items() if k in _TEXT_OPTIONS}
        return cls(folder, Molmo2ImageSettings(**image), Molmo2VideoSettings(**video), **options)

    # -- media tokens -------------------------------------------------------------------------------
    def image_tokens(self, grid) -> list[int]:
        low_h, low_w, high_h, high_w = (int(v) for v in grid)
        t = self.tokenizer.ids
        low_row = [t["<im_patch>"]] * low_w + [t["<im_col>"]] * self.use_single_crop_col_tokens
        high_row = [t["<im_patch>"]] * high_w + [t["<im_col>"]] * self.image_use_col_tokens
        start = t["<low_res_im_start>"] if self.use_single_crop_start_token else t["<im_start>"]
        return ([start] + low_row * low_h + [t["<im_end>"]]
                + [t["<im_start>"]] + high_row * high_h + [t["<im_end>"]])

    def video_segments(self, grid, timestamps) -> list:
        """Text pieces (frame times) and token runs (frames) of one video."""
        _, rows, cols = (int(v) for v in grid)
        t = self.tokenizer.ids
        start = t["<frame_start>"] if self.use_frame_special_tokens else t["<im_start>"]
        end = t["<frame_end>"] if self.use_frame_special_tokens else t["<im_end>"]
        frame = [start] + ([t["<im_patch>"]] * cols + [t["<im_col>"]] * self.video_use_col_tokens) * rows + [end]
        out = []
        for k, time in enumerate(timestamps):
            out += [(" " if k else "") + f"{time:.1f} ", frame]
        return out

    # -- the processor ------------------------------------------------------------------------------
    def __call__(self, text=None, images=None, videos=None, **options) -> dict[str, np.ndarray]:
        """Model inputs of prompts (a string or a list) with their images and videos (uint8 [H, W, 3] arrays;
        a video is a list of frames or a [T, H, W, 3] array). Options: video_metadata (per video, dicts with
        total_num_frames / fps / duration / frames_indices), do_sample_frames, num_frames, fps (frames per
        second to sample), padding_side ("right" or "left")."""
        return self.process(text, images, videos, **options)[0]

    def process(self, text=None, images=None, videos=None, **options) -> tuple[dict, list, list]:
        """The call's arrays, and what each image (Molmo2ImageInputs) and video (Molmo2VideoInputs: its
        sampled frames' indices and times) gave."""
        _check_options("Molmo2Processor call", options, _CALL_OPTIONS)
        if text is None and images is None and videos is None:
            raise ValueError("Molmo2Processor: nothing to process (no text, images or videos)")
        out: dict[str, np.ndarray] = {}
        per_image, per_video = [], []
        if images is not None:
            arrays, per_image = process_images(images, self.image)
            out.update(arrays)
        if videos is not None:
            sampling = {k: options[k] for k in ("do_sample_frames", "num_frames", "fps") if k in options}
            arrays, per_video = process_videos(videos, self.video, options.get("video_metadata"), **sampling)
            out.update(arrays)
        if text is not None:
            out = {**self._text_inputs(text, per_image, per_video, options.get("padding_side", "right")), **out}
        return out, per_image, per_video

    def _text_inputs(self, text, per_image, per_video, padding_side: str) -> dict[str, np.ndarray]:
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"text: expected a string or a non-empty list of strings, got {type(text).__name__}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        n_img = sum(t.count(molmo2_chat.IMAGE_MARKER) for t in texts)
        n_vid = [t.count(molmo2_chat.VIDEO_MARKER) for t in texts]
        if n_img != len(per_image):
            raise ValueError(f"text has {n_img} {molmo2_chat.IMAGE_MARKER} markers for {len(per_image)} images")
        if sum(n_vid) != len(per_video) or max(n_vid) > 1:
            raise ValueError(f"text has {sum(n_vid)} {molmo2_chat.VIDEO_MARKER} markers (at most one per prompt) "
                             f"for {len(per_video)} videos")
        images, videos = iter(per_image), iter(per_video)
        rows = [self.prompt_ids(prompt, images, videos) for prompt in texts]
        length = max(len(r) for r in rows)
        if len(rows) > 1 and any(len(r) < length for r in rows) and self.tokenizer.pad_id is None:
            raise ValueError("prompts of different lengths need a pad_token in the tokenizer's configuration")
        input_ids = np.full((len(rows), length), self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0,
                            np.int64)
        attention_mask = np.zeros((len(rows), length), np.int64)
        for k, r in enumerate(rows):
            span = slice(0, len(r)) if padding_side == "right" else slice(length - len(r), length)
            input_ids[k, span] = r
            attention_mask[k, span] = 1
        mm_types = np.where(np.isin(input_ids, self.mm_token_ids), 1, 0)
        mm_types = np.where(input_ids == self.video_token_id, 2, mm_types).astype(np.int64)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_types}

    def prompt_ids(self, prompt: str, images, videos) -> list[int]:
        """Token ids of one prompt, BOS in front unless it starts with it; its image / video markers take the
        tokens of the next items of the iterators `images` / `videos` (Molmo2ImageInputs / Molmo2VideoInputs)."""
        bos = self.tokenizer.bos_token
        segments = []
        for piece in _MARKERS.split(prompt if prompt.startswith(bos) else bos + prompt):
            if piece == molmo2_chat.IMAGE_MARKER:
                segments.append(self.image_tokens(next(images).grid))
            elif piece == molmo2_chat.VIDEO_MARKER:
                item = next(videos)
                segments += self.video_segments(item.grid, item.timestamps)
            else:
                segments.append(piece)
        return self.tokenizer.encode_segments(segments)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False,
                            **options):
        """The conversation's prompt (molmo2_chat.format_chat), or with tokenize=True the model inputs of it and
        of the images and videos in its "image" / "video" parts; options go to the call."""
        prompt = molmo2_chat.format_chat(messages, add_generation_prompt)
        if not tokenize:
            return prompt
        images, videos = molmo2_chat.media(messages)
        return self(text=prompt, images=images or None, videos=videos or None, **options)
