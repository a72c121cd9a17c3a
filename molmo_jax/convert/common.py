"""Small pieces shared by import, export and init-from-base: the run summary, tokenizer files."""
from __future__ import annotations

import dataclasses
import pathlib
import resource
import shutil
import sys
import time

from molmo_jax.torch_format import WeightsError

# Files that make up a Hugging Face tokenizer (whichever of them a directory has are copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.json",
                   "chat_template.jinja")


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


@dataclasses.dataclass
class Summary:
    command: str
    source: str
    destination: str
    model: str = ""
    n_tensors: int = 0
    n_params: int = 0
    bytes_written: int = 0
    dtype: str = ""
    files: int = 0
    notes: list = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.time)
    seconds: float = 0.0
    peak_rss: int = 0

    def finish(self):
        self.seconds = time.time() - self.started
        self.peak_rss = peak_rss_bytes()
        return self

    def lines(self) -> list[str]:
        out = [f"{self.command}: {self.source} -> {self.destination}",
               f"  model {self.model}: {self.n_params:,} parameters in {self.n_tensors} tensors, {self.dtype}",
               f"  wrote {self.bytes_written / 1e9:.3f} GB of tensor data in {self.files} file(s) "
               f"in {self.seconds:.1f} s; peak RSS {self.peak_rss / 1e9:.2f} GB"]
        return out + [f"  note: {n}" for n in self.notes]


class Progress:
    """Counts bytes written; forwards (bytes just written, total bytes to write) to an optional
    callback, the CLI's progress bar."""

    def __init__(self, summary: Summary, callback=None, total: int = 0):
        self.summary = summary
        self.callback = callback
        self.total = total

    def __call__(self, _name, n: int):
        self.summary.bytes_written += n
        if self.callback:
            self.callback(n, self.total)


def tokenizer_files(directory) -> list[pathlib.Path]:
    directory = pathlib.Path(directory)
    return [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]


def copy_tokenizer(src, dst: pathlib.Path, required=True) -> int:
    """Copy the tokenizer files of `src` into `dst` (created); returns how many were copied."""
    files = tokenizer_files(src) if pathlib.Path(src).is_dir() else []
    if not files:
        if required:
            raise WeightsError(f"{src}: no tokenizer files there (looked for {', '.join(TOKENIZER_FILES[:3])}, ...)")
        return 0
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dst / f.name)
    return len(files)
