"""Molmo answering API: image + prompt -> answer text, points in pixels, count.

    from molmo_jax.inference import Answerer
    molmo = Answerer.load("checkpoints/molmo-7b-d")            # + tokenizer_dir=... if it has none
    answer = molmo.ask("photo.jpg", "Point to the mugs.", max_new_tokens=192)
    answer.text, answer.points_px, answer.count
    answers = molmo.ask_many([("a.jpg", "How many cats?"), ("b.png", "Describe this image.")])

A checkpoint is anything `molmo_jax.weights.load` reads: a molmo_jax model directory, a
training run or one of its step directories, or a PyTorch directory (original / released HF form,
converted in memory). Prompts are formatted as the released models expect (docs/architecture.md#prompt-formatting): style
"demo" gives " User: {prompt} Assistant:"; another style (e.g. "vqa2") adds its "vqa2:" prefix.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Callable, Iterable, Sequence

import numpy as np

from molmo_jax import generate as gen_lib
from molmo_jax import points as points_lib
from molmo_jax.preprocess import Collator, MolmoTokenizer, Preprocessor, TokenizerError

DEFAULT_MAX_NEW_TOKENS = 200   # the HF model card's setting; the original's evals use 12..448
SEQ_BUCKET = 64                # prompts are padded to a multiple of this (bounded recompilation)


class NoTokenizerError(TokenizerError):
    """The checkpoint carries no tokenizer and none was given."""


@dataclasses.dataclass
class Answer:
    """One generated answer.

    text: the decoded answer (cut at EOS or a stop string, stripped).
    tokens: the generated ids (EOS included when produced).
    points_px: float [N, 2] (x, y) pixels of the input image for every point in the text
        (empty without an image). count: the number a counting answer states (or its points), else None.
    finish: "eos", "stop" (a stop string) or "length" (max_new_tokens reached).
    score: sum of the generated tokens' log-probs (beam search: divided by length ** length_penalty).
    """
    text: str
    tokens: np.ndarray
    points_px: np.ndarray
    count: int | None
    finish: str
    score: float
    prompt: str = ""
    image_size: tuple[int, int] | None = None   # (width, height)
    valid_point_format: bool = False

    def to_json(self) -> dict:
        return dict(text=self.text, tokens=[int(t) for t in self.tokens],
                    points_px=[[round(float(x), 2), round(float(y), 2)] for x, y in self.points_px],
                    count=self.count, finish=self.finish, score=float(self.score), prompt=self.prompt,
                    image_size=list(self.image_size) if self.image_size else None,
                    valid_point_format=self.valid_point_format)


@dataclasses.dataclass
class Failed:
    """A request that could not be answered (unreadable image, prompt too long, malformed record), kept
    in its place among the answers so that one bad request costs only itself."""
    error: str
    prompt: str = ""
    line: int | None = None   # the request's line in a JSONL file, when it came from one

    def to_json(self) -> dict:
        return {k: v for k, v in dict(line=self.line, error=self.error, prompt=self.prompt).items() if v is not None}


def make_answer(text: str, tokens, finish: str, score: float, image_size=None, prompt: str = "",
                stop_strings: Sequence[str] = ()) -> Answer:
    """Parse points and count out of a generated text (`image_size` = (width, height))."""
    text, _ = gen_lib.cut_at_stop(text, stop_strings)
    text = text.strip()
    if image_size is not None:
        parsed = points_lib.parse_points(text, int(image_size[0]), int(image_size[1]))
        pts, valid = parsed.points, parsed.valid_format
    else:
        pts, valid = np.zeros((0, 2)), False
    return Answer(text=text, tokens=np.asarray(tokens, np.int64), points_px=np.asarray(pts, np.float64).reshape(-1, 2),
                  count=points_lib.parse_count(text), finish=finish, score=float(score), prompt=prompt,
                  image_size=tuple(int(v) for v in image_size) if image_size is not None else None,
                  valid_point_format=bool(valid))


def find_tokenizer(checkpoint, tokenizer_dir=None) -> pathlib.Path:
    """The tokenizer folder: `tokenizer_dir`, else the checkpoint's `tokenizer/` (a training run's
    is next to its config.json), else the checkpoint folder itself if it holds a tokenizer.json
    (released HF directories)."""
    if tokenizer_dir is not None:
        path = pathlib.Path(tokenizer_dir)
        if not (path / "tokenizer.json").is_file() and not (path.is_file() and path.suffix == ".json"):
            raise TokenizerError(f"{path}: no tokenizer.json there")
        return path
    from molmo_jax.weights import find_checkpoint

    info = find_checkpoint(checkpoint)
    base = pathlib.Path(checkpoint)
    candidates = [base / "tokenizer"]
    if info.config_path is not None:
        candidates.append(info.config_path.parent / "tokenizer")
    candidates.append(base if base.is_dir() else base.parent)
    for folder in candidates:
        if (folder / "tokenizer.json").is_file():
            return folder
    raise NoTokenizerError(f"{checkpoint}: no tokenizer found (looked for tokenizer.json in "
                           f"{', '.join(str(c) for c in dict.fromkeys(candidates))}); pass one with --tokenizer DIR")


def _request(index: int, r) -> tuple:
    """(image, prompt) of one request given as a pair or as a {"image", "prompt"} dict."""
    if isinstance(r, dict):
        if "prompt" not in r:
            raise ValueError(f"request {index}: no 'prompt' (keys: {sorted(r)})")
        return r.get("image"), r["prompt"]
    if not isinstance(r, (tuple, list)) or len(r) != 2:
        raise ValueError(f"request {index}: expected (image, prompt) or a dict, got {type(r).__name__}")
    return tuple(r)


def sampling_from(max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **kw) -> gen_lib.Sampling:
    return gen_lib.Sampling(max_new_tokens=max_new_tokens, **kw)


class Answerer:
    """A model, its tokenizer and a compiled generator. Build it with `Answerer.load`."""

    def __init__(self, cfg, model, tokenizer: MolmoTokenizer, mesh=None, max_crops: int | None = None,
                 style: str = "demo"):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.style = style
        self.preprocessor = Preprocessor(cfg, tokenizer, max_crops=max_crops)
        self.generator = gen_lib.Generator(model, tokenizer.eos_id, detokenize=tokenizer.decode, mesh=mesh)

    @classmethod
    def load(cls, checkpoint, tokenizer_dir=None, mesh=None, weights_kind=None, **kw) -> "Answerer":
        """From any checkpoint `weights.load` reads; with `mesh`, parameters are read straight into
        their shardings; `weights_kind` "int8" / "int4[:GROUP]" quantizes the LLM's kernels. Raises
        WeightsError / TokenizerError with a one-line reason."""
        from molmo_jax import weights

        tok_dir = find_tokenizer(checkpoint, tokenizer_dir)
        cfg, model = weights.load(checkpoint, mesh=mesh, quantize=weights_kind)
        return cls(cfg, model, MolmoTokenizer(str(tok_dir), cfg.llm.vocab_size), mesh=mesh, **kw)

    # -- preprocessing -----------------------------------------------------------------------------
    def example(self, image, prompt: str, style: str | None = None) -> dict:
        """Model inputs of one request (unbatched), with metadata.image_size = (width, height)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        conv = {"style": style or self.style, "prompt": prompt}
        return self.preprocessor({"image": image, "message_list": [conv]}, for_inference=True)

    def collate(self, examples: list[dict]) -> dict:
        longest = max(len(ex["input_ids"]) for ex in examples)
        return Collator(seq_buckets=(SEQ_BUCKET * math.ceil(longest / SEQ_BUCKET),))(examples)

    # -- answering ---------------------------------------------------------------------------------
    def ask(self, image, prompt: str, *, style: str | None = None, **sampling) -> Answer:
        """Answer one prompt about one image (a path, bytes, PIL image or HxWx3 array; None = no
        image). `sampling`: the fields of generate.Sampling (max_new_tokens, temperature, top_k,
        top_p, seed, beam_size, length_penalty, stop_strings)."""
        return self.ask_many([(image, prompt)], style=style, **sampling)[0]

    def ask_many(self, requests: Iterable, *, batch_size: int = 8, style: str | None = None,
                 progress: Callable[[list], None] | None = None, keep_going: bool = False,
                 **sampling) -> list:
        """Answer (image, prompt) pairs (or {"image", "prompt"} dicts) in batches of `batch_size`;
        prompts of different lengths and crop counts share a batch. `progress(answers)` is called
        after each batch. With `keep_going`, a request that cannot be answered (or is a `Failed`
        already) becomes a `Failed` in its place instead of raising."""
        settings = sampling_from(**sampling)
        requests = list(requests)
        answers: list = []
        for start in range(0, len(requests), batch_size):
            slots: list = []          # per request: its example, or its Failed
            for index, r in enumerate(requests[start:start + batch_size], start):
                try:
                    if isinstance(r, Failed):
                        slots.append(r)
                        continue
                    image, prompt = _request(index, r)
                    ex = self.example(image, prompt, style)
                    if keep_going:
                        gen_lib.check_fits(len(ex["input_ids"]), settings.max_new_tokens, self.cfg)
                    slots.append((ex, prompt))
                except ValueError as e:  # ImageError and TokenizerError are ValueErrors too
                    if not keep_going:
                        raise
                    line = r.get("line") if isinstance(r, dict) else None
                    slots.append(Failed(str(e), r.get("prompt", "") if isinstance(r, dict) else "", line))
            todo = [s for s in slots if not isinstance(s, Failed)]
            done = iter(self._answer([ex for ex, _ in todo], [p for _, p in todo], settings) if todo else [])
            batch_answers = [s if isinstance(s, Failed) else next(done) for s in slots]
            answers.extend(batch_answers)
            if progress is not None:
                progress(batch_answers)
        return answers

    def _answer(self, examples: list[dict], prompts: list[str], settings: gen_lib.Sampling) -> list[Answer]:
        out = self.generator(self.collate(examples), settings)
        return [make_answer(self.tokenizer.decode(out["tokens"][i]), out["tokens"][i][:out["lengths"][i]],
                            str(out["finish"][i]), out["scores"][i], ex["metadata"].get("image_size"),
                            prompt, settings.stop_strings)
                for i, (ex, prompt) in enumerate(zip(examples, prompts))]
