"""Writing checkpoints safely, and what a conversion reports.

Every writer validates first and writes into a temporary sibling of its destination that becomes
the destination by one rename, only when everything succeeded (`atomic_output`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import resource
import secrets
import shutil
import sys
import time

from molmo_jax.weights.errors import WeightsError

# Files that make up a Hugging Face tokenizer (whichever of them a directory has are copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.json",
                   "chat_template.jinja")


def check_destination(dst, overwrite=False) -> pathlib.Path:
    dst = pathlib.Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise WeightsError(f"{dst} already exists (use --overwrite / overwrite=True to replace it)")
    return dst


def _remove(path: pathlib.Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(dst, overwrite=False):
    """Yields a temporary sibling path to write `dst` into (a directory or a file); it becomes `dst`
    by a rename only when the block succeeds. On any failure, Ctrl-C included, the temporary is
    removed and `dst` is left as it was, so a failed run never leaves a `dst` that looks valid."""
    dst = check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    tmp = dst.parent / f".{dst.name}.partial-{tag}"
    try:
        yield tmp
        if dst.exists():  # --overwrite: move the old one aside so dst is never half old, half new
            old = dst.parent / f".{dst.name}.old-{tag}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            _remove(old)
        else:
            os.rename(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise


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
