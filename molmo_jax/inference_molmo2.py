"""Molmo2 answering API: images (one or several) or a video + prompt -> answer text, points and tracks.

    from molmo_jax.inference_molmo2 import Molmo2Answerer
    molmo2 = Molmo2Answerer.load("checkpoints/molmo2-4b")          # + tokenizer_dir=... if it has none
    answer = molmo2.ask("Point to the boats.", images=["harbour.jpg"])
    answer = molmo2.ask("Track the ball.", video=frames, fps=2.0)    # frames: list of HxWx3 arrays
    answer.text, answer.points.points, answer.points.frames, answer.count

The processor's settings (crop size, crops, pooling windows, frame sampling) are the model config's
(`cfg.vit`, `cfg.connector`, `cfg.image`), so a checkpoint always gets the preprocessing it was made for;
the tokenizer must place the Molmo2 tokens at the ids the config names (checked on load). Prompts go
through Molmo2's chat template (`preprocess.molmo2_chat`) with the generation prompt; generation is
`molmo_jax.generate` (KV cache, the model's own attention, bidirectional among the image tokens).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from molmo_jax import generate as gen_lib
from molmo_jax import points as points_lib
from molmo_jax.molmo2_points import Molmo2Points, parse_molmo2_points
from molmo_jax.preprocess import TokenizerError
from molmo_jax.preprocess import molmo2_chat
from molmo_jax.preprocess.image_io import load_image
from molmo_jax.preprocess.molmo2_image import Molmo2ImageSettings
from molmo_jax.preprocess.molmo2_processor import Molmo2Processor, Molmo2Tokenizer
from molmo_jax.preprocess.molmo2_video import Molmo2VideoSettings

DEFAULT_MAX_NEW_TOKENS = 200
SEQ_BUCKET = 64   # prompts are padded to a multiple of this (bounded recompilation)
# The config's token ids and the tokenizer's names of them.
TOKEN_NAMES = dict(image_start="<im_start>", image_end="<im_end>", image_patch="<im_patch>",
                   low_res_image_start="<low_res_im_start>", frame_start="<frame_start>", frame_end="<frame_end>")


@dataclasses.dataclass
class Molmo2Answer:
    """One answer: text (cut at EOS / a stop string, stripped), tokens, points (pixels of their image,
    frame = image number or video time in seconds), count (distinct objects pointed at, or the number a
    counting answer states), finish ("eos", "stop", "length"), score (sum of token log-probs)."""
    text: str
    tokens: np.ndarray
    points: Molmo2Points
    count: int | None
    finish: str
    score: float
    prompt: str = ""
    sizes: tuple = ()                  # (width, height) of every image, or of the video's frames
    timestamps: tuple = ()             # seconds of every sampled video frame
    frame_indices: tuple = ()          # which of the given frames were sampled

    def to_json(self) -> dict:
        p = self.points
        return dict(text=self.text, tokens=[int(t) for t in self.tokens], count=self.count, finish=self.finish,
                    score=float(self.score), prompt=self.prompt, sizes=[list(s) for s in self.sizes],
                    timestamps=[round(float(t), 3) for t in self.timestamps],
                    frame_indices=[int(i) for i in self.frame_indices],
                    points=[dict(frame=float(f), id=int(i), x=round(float(x), 2), y=round(float(y), 2))
                            for (x, y), f, i in zip(p.points, p.frames, p.ids)])


def media_settings(cfg, max_crops: int | None = None) -> tuple[Molmo2ImageSettings, Molmo2VideoSettings]:
    """The image and video processor settings a model config implies; `max_crops` overrides the config's."""
    v, c, im = cfg.vit, cfg.connector, cfg.image
    view = dict(crop_size=int(v.image_size[0]), patch=int(v.patch_size), mean=tuple(im.mean), std=tuple(im.std))
    image = Molmo2ImageSettings(max_crops=int(im.max_crops if max_crops is None else max_crops),
                                overlap_margins=tuple(im.overlap_margins), pooling=(int(c.pool_h), int(c.pool_w)), **view)
    video = Molmo2VideoSettings(pooling=(int(c.video_pool_h), int(c.video_pool_w)),
                                num_frames=int(im.video_max_frames), max_fps=float(im.video_max_fps), **view)
    return image, video


def processor_for(cfg, tokenizer, max_crops: int | None = None) -> Molmo2Processor:
    """The Molmo2Processor a model config implies (see the module docstring); `tokenizer`: a Molmo2Tokenizer
    or its folder; `max_crops` overrides the config's."""
    image, video = media_settings(cfg, max_crops)
    im = cfg.image
    proc = Molmo2Processor(tokenizer, image, video, image_use_col_tokens=bool(im.use_col_tokens),
                           video_use_col_tokens=bool(im.video_use_col_tokens))
    wrong = [f"{name} is {proc.tokenizer.ids[name]} (the model's {key}: {cfg.tokens[key]})"
             for key, name in TOKEN_NAMES.items() if proc.tokenizer.ids[name] != cfg.tokens[key]]
    if wrong:
        raise TokenizerError(f"{proc.tokenizer.path}: not this model's tokenizer: {'; '.join(wrong)}")
    return proc


def model_batch(inputs: dict, bucket: int = SEQ_BUCKET) -> dict:
    """Processor outputs -> the model's prompt batch: padding -1 in input_ids (from attention_mask), the
    sequence padded to a multiple of `bucket`; the description-only arrays (grids, crop counts) dropped."""
    ids = np.where(inputs["attention_mask"] > 0, inputs["input_ids"], -1).astype(np.int32)
    t = bucket * math.ceil(ids.shape[1] / bucket)
    pad = ((0, 0), (0, t - ids.shape[1]))
    batch = dict(input_ids=np.pad(ids, pad, constant_values=-1),
                 mm_token_type_ids=np.pad(inputs["mm_token_type_ids"].astype(np.int32), pad))
    for key in ("pixel_values", "image_token_pooling", "pixel_values_videos", "video_token_pooling"):
        if key in inputs:
            batch[key] = inputs[key]
    return batch


class Molmo2Answerer:
    """A Molmo2, its processor and a compiled generator. Build it with `Molmo2Answerer.load`."""

    def __init__(self, cfg, model, tokenizer, mesh=None, max_crops: int | None = None):
        self.cfg = cfg
        self.processor = processor_for(cfg, tokenizer, max_crops)
        tok = self.processor.tokenizer
        self.eos_id = tok._tok.token_to_id(tok.eos_token)
        self.generator = gen_lib.Generator(model, self.eos_id, detokenize=tok.decode, mesh=mesh)

    @classmethod
    def load(cls, checkpoint, tokenizer_dir=None, mesh=None, weights_kind=None) -> "Molmo2Answerer":
        """From any checkpoint `weights.load` reads (a transformers Molmo2 directory, ours, a training run).
        Raises WeightsError / TokenizerError with a one-line reason."""
        from molmo_jax import weights
        from molmo_jax.inference import find_tokenizer

        tok_dir = find_tokenizer(checkpoint, tokenizer_dir)
        cfg, model = weights.load(checkpoint, mesh=mesh, quantize=weights_kind)
        return cls(cfg, model, Molmo2Tokenizer(str(tok_dir)), mesh=mesh)

    def inputs(self, prompt: str, images: Sequence = (), video=None, fps: float | None = None) -> tuple[dict, dict]:
        """(processor outputs, facts: image sizes and frame times) of one prompt about images or a video
        (paths, bytes, PIL images or HxWx3 arrays; a video is a sequence of frames shot at `fps` per second;
        None: the processor's sampling rate is assumed)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        if len(images) and video is not None:
            raise ValueError("give images or a video, not both")
        media = [load_image(im) for im in (images if video is None else video)]
        if video is not None and not media:
            raise ValueError("the video has no frames")
        content = ([{"type": "image", "image": a} for a in media] if video is None
                   else [{"type": "video", "video": media}])
        messages = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
        options = {}
        if video is not None and fps is not None:
            if not fps > 0:
                raise ValueError(f"fps must be > 0, got {fps}")
            options["video_metadata"] = [dict(total_num_frames=len(media), fps=float(fps))]
        text = molmo2_chat.format_chat(messages, add_generation_prompt=True)
        out, _, per_video = self.processor.process(text, media if video is None and media else None,
                                                   [media] if video is not None else None, **options)
        sizes = tuple((a.shape[1], a.shape[0]) for a in (media if video is None else media[:1]))
        stamps = tuple(per_video[0].timestamps) if per_video else ()
        indices = tuple(per_video[0].frames_indices) if per_video else ()
        return out, dict(sizes=sizes, timestamps=stamps, frame_indices=indices)

    def ask(self, prompt: str, images: Sequence = (), video=None, fps: float | None = None,
            **sampling) -> Molmo2Answer:
        """Answer one prompt. `sampling`: generate.Sampling's fields (max_new_tokens, temperature, ...)."""
        settings = gen_lib.Sampling(**{"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **sampling})
        inputs, facts = self.inputs(prompt, images, video, fps)
        gen_lib.check_fits(int(inputs["attention_mask"].sum()), settings.max_new_tokens, self.cfg)
        out = self.generator(model_batch(inputs), settings)
        text, _ = gen_lib.cut_at_stop(self.processor.tokenizer.decode(out["tokens"][0]), settings.stop_strings)
        text = text.strip()
        sizes = facts["sizes"]
        if video is not None or len(sizes) == 1:
            pts = parse_molmo2_points(text, *sizes[0])
        else:
            pts = parse_molmo2_points(text, [w for w, _ in sizes], [h for _, h in sizes])
        stated = points_lib.parse_count(text)
        count = stated if stated is not None else (pts.count if pts.num_points else None)
        return Molmo2Answer(text=text, tokens=np.asarray(out["tokens"][0][:out["lengths"][0]], np.int64), points=pts,
                            count=count, finish=str(out["finish"][0]), score=float(out["scores"][0]), prompt=prompt,
                            sizes=sizes, timestamps=facts["timestamps"], frame_indices=facts["frame_indices"])
