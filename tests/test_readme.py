"""Every command in README.md runs: each is rehearsed here on tiny local stand-ins.

The commands are read from README.md's fenced code blocks (continuation lines joined, shell comments
dropped; `gcloud ... --command "..."` contributes the command it runs on the TPU hosts). REHEARSALS
maps each of them, by its exact normalised text, to its rehearsal: the same tool with the same flags,
where the README's placeholders (a downloaded checkpoint, your photo, your data, the Hub files, the
7B/72B configs, run folders) are replaced by the stand-ins listed in STAND_INS, and where a few flags
are appended, each with its reason. A rehearsal runs as `python -m tools.X` from the repository root
in a subprocess, as a reader would run it. `test_every_readme_command_has_a_rehearsal` fails when the
README and this table drift apart, in either direction.

The rehearsals share one scratch folder per module (the README's working tree: `runs/`, `images/`,
...), so commands that feed each other (import -> infer -> fine-tune -> export, download -> build ->
train) run in the README's order, each at most once, whichever test asks first.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import json
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys
import threading
from typing import Callable

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GOLDEN = ROOT / "tests" / "fixtures" / "golden"
TINY_TOKENIZER = ROOT / "molmo_jax" / "assets" / "tiny_tokenizer"
MOLMO2_TOKENIZER = ROOT / "molmo_jax" / "assets" / "molmo2_tiny_tokenizer"

# Fenced blocks that are not commands, by their first word: the source tree drawn in "The house".
NOT_COMMAND_BLOCKS = {"tools/": "the source tree diagram"}

# The stand-in PixMo-Cap Hub file: PixMo-Cap has only a Hub train split and its builder holds out
# 2048 images for validation, or half of them in a trial build as small as this one.
PIXMO_CAP_IMAGES = 8


# ------------------------------------------------------------------------------------------------
# Reading the README

def normalise(command: str) -> str:
    """One canonical text per command: shell words re-joined, comments dropped."""
    return shlex.join(shlex.split(command, comments=True))


def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def remote_command(argv: list[str]) -> list[str] | None:
    """`gcloud ... ssh HOST --command "cd molmo_jax && CMD"` -> CMD's words (the checkout is the
    repository root, where the rehearsal runs anyway); None for any other command."""
    if argv[0] != "gcloud":
        return None
    value = next((argv[i + 1] for i, a in enumerate(argv) if a == "--command"),
                 next((a.split("=", 1)[1] for a in argv if a.startswith("--command=")), None))
    assert value is not None, f"a gcloud command without --command: {shlex.join(argv)}"
    steps = [s.strip() for s in value.split("&&")]
    assert steps[0] == "cd molmo_jax" and len(steps) == 2, f"unexpected remote command {value!r}"
    return shlex.split(steps[1])


def readme_commands(text: str) -> list[str]:
    """The README's commands, normalised, in order. A gcloud line stands for the command it runs."""
    commands = []
    for block in fenced_blocks(text):
        if block.split(maxsplit=1)[0] in NOT_COMMAND_BLOCKS:
            continue
        for line in re.sub(r"\\\n", " ", block).splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                inner = remote_command(argv)
                commands.append(shlex.join(inner if inner is not None else argv))
    return commands


# ------------------------------------------------------------------------------------------------
# The stand-ins and the scratch folder

class Stage:
    """The README's working tree in a scratch folder, its inputs as tiny local files made on demand,
    and the rehearsals run so far (each command runs once; `after` commands run first)."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.runs: dict[str, subprocess.CompletedProcess] = {}
        self.server: http.server.ThreadingHTTPServer | None = None

    def out(self, word: str) -> str:
        """A README output path (relative, or absolute like /tmp/out.npz) placed in the scratch folder;
        its parent exists, as /tmp and the pod's /ckpt do."""
        path = self.root / word.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    @functools.cached_property
    def released(self) -> str:
        """A tiny Molmo (the `tiny` preset, random weights) exported in the released HF layout
        (config.json, sharded safetensors + index, tokenizer files), as a downloaded
        Molmo-7B-D-0924 directory looks; the bundled tiny tokenizer stands in for Qwen2's. The
        export's config.json also carries the molmo_jax config, so the import gives back the `tiny`
        preset that configs/tiny_*.py train (reading a real release's config.json is test_convert's
        and test_hf_parity's business)."""
        from molmo_jax import config as config_lib
        from molmo_jax import weights
        from molmo_jax.weights import export_checkpoint
        from molmo_jax.models import create_model

        cfg = config_lib.tiny()
        weights.save_model(self.root / "_tiny_src", cfg, create_model(cfg, seed=0))
        dst = self.root / "path" / "to" / "Molmo-7B-D-0924"
        export_checkpoint(self.root / "_tiny_src", dst, tokenizer=TINY_TOKENIZER, shard_size="500KB")
        return str(dst)

    @functools.cached_property
    def molmo2_released(self) -> str:
        """A tiny Molmo2 (the `molmo2_tiny` preset, transformers' random init) as
        `Molmo2ForConditionalGeneration.save_pretrained` writes it, with the bundled tiny Molmo2 tokenizer's
        files beside it, as a downloaded Molmo2-4B directory looks."""
        import shutil

        import torch
        import transformers

        from molmo_jax import config as config_lib
        from molmo_jax.weights.mappings import molmo2 as molmo2_mapping

        hf_cfg = transformers.Molmo2Config(**molmo2_mapping.to_released(config_lib.get_config("molmo2_tiny"),
                                                                        "float32"))
        torch.manual_seed(0)
        dst = self.root / "path" / "to" / "Molmo2-4B"
        transformers.Molmo2ForConditionalGeneration(hf_cfg).save_pretrained(dst)
        for f in MOLMO2_TOKENIZER.glob("*.json"):
            shutil.copy2(f, dst / f.name)
        return str(dst)

    @functools.cached_property
    def frames(self) -> str:
        """A video as a folder of frames: 6 PNGs (3 s at the README's --fps 2)."""
        folder = self.root / "frames"
        folder.mkdir()
        for i in range(6):
            _picture(64, 48, seed=20 + i).save(folder / f"{i:04d}.png")
        return str(folder) + "/"

    @functools.cached_property
    def photo(self) -> str:
        path = self.root / "photo.jpg"
        _picture(96, 64, seed=1).save(path, format="JPEG")
        return str(path)

    @functools.cached_property
    def my_data(self) -> str:
        """Your data: train.jsonl, one {image, question, answer} per line, images beside it."""
        folder = self.root / "my_data"
        folder.mkdir()
        rows = []
        for i in range(4):
            _picture(48, 40, seed=10 + i).save(folder / f"img{i}.png")
            rows.append({"image": f"img{i}.png", "question": "What is in the middle?",
                         "answer": f"A square, number {i}."})
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(folder) + "/"

    @functools.cached_property
    def hub_cap(self) -> str:
        """allenai/pixmo-cap as the Hub stores it (data/train-00000-of-00001.parquet: image_url,
        caption, transcripts), its image URLs served by a local HTTP server on 127.0.0.1."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        base = self._serve_images()
        n = PIXMO_CAP_IMAGES
        table = pa.table({
            "image_url": [f"{base}/cap/{i}.png" for i in range(n)],
            "caption": [f"A small noisy picture, number {i}." for i in range(n)],
            "transcripts": [[f"um this is picture {i}"] for i in range(n)],
        }, schema=pa.schema([("image_url", pa.string()), ("caption", pa.string()),
                             ("transcripts", pa.list_(pa.string()))]))
        path = self.root / "hub" / "pixmo-cap" / "data" / "train-00000-of-00001.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(table, path)
        return str(self.root / "hub" / "pixmo-cap")

    @functools.cached_property
    def predictions(self) -> str:
        """Predictions made anywhere, in the VQA scorer's JSONL form (accuracy (1 + 1/3) / 2)."""
        path = self.root / "predictions.jsonl"
        rows = [{"prediction": "Two", "answers": ["2"] * 3 + ["3"] * 7},
                {"prediction": "Answer: the cat.", "answers": ["cat"] + ["dog"] * 9}]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    def _serve_images(self) -> str:
        body = _png_bytes(_picture(24, 16, seed=3))

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # -- running ---------------------------------------------------------------------------------
    def argv(self, rehearsal: Rehearsal, words: list[str]) -> list[str]:
        """README words -> the rehearsal's: each word (or the value of --flag=VALUE) that names a
        placeholder is replaced, then the rehearsal's extra flags are appended."""
        table = {**STAND_INS, **rehearsal.replace}

        def swap(word):
            if word in table:
                return table[word](self)
            flag, eq, value = word.partition("=")
            if eq and value in table:
                return f"{flag}={table[value](self)}"
            return word
        return [swap(w) for w in words] + list(rehearsal.extra)

    def rehearse(self, command: str) -> subprocess.CompletedProcess:
        if command not in self.runs:
            rehearsal = REHEARSALS[command]
            for before in rehearsal.after:
                assert self.rehearse(normalise(before)).returncode == 0, f"{before!r} failed"
            argv = self.argv(rehearsal, shlex.split(command))
            self.runs[command] = run(argv)
        return self.runs[command]


def subprocess_env() -> dict:
    """The test process's environment without the 8 simulated devices conftest asks for: a README
    user's process sees one CPU device (tools.aot cpu-N sets its own count)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


def run(argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def _picture(width: int, height: int, seed: int):
    from PIL import Image
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), rng.integers(0, 255, 3), np.uint8)
    pixels[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _stdout_lines(proc) -> list[str]:
    return proc.stdout.strip().splitlines()


def _metrics(workdir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _flat_params(path):
    from molmo_jax import weights
    from molmo_jax.weights.params import model_to_flat
    _, model = weights.load(path)
    return model_to_flat(model)


# ------------------------------------------------------------------------------------------------
# The checks: one meaningful output per command

def check_import(stage, proc):
    dst = stage.out("runs/molmo_7b_d")
    assert "import:" in proc.stdout
    assert (pathlib.Path(dst) / "tokenizer" / "tokenizer.json").is_file()  # copied from the source
    got, want = _flat_params(dst), _flat_params(stage.released)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=".".join(k))


def check_infer(stage, proc):
    from PIL import Image
    drawn = stage.out("points.png")
    assert re.fullmatch(rf"wrote {re.escape(drawn)} \(\d+ points drawn\)", _stdout_lines(proc)[-1]), proc.stdout
    assert Image.open(drawn).size == Image.open(stage.photo).size


def check_build_vqa(stage, proc):
    from input_pipeline.builders.vqa import Vqa

    lines = _stdout_lines(proc)
    assert lines[0] == f"vqa: built dataset at {stage.out('runs/data')}/vqa/my_data/{Vqa.VERSION}"
    assert lines[1:] == ["train: 4 examples written, 0 records skipped"]


def check_train(workdir, initialised_from=None):
    def check(stage, proc):
        out = stage.out(workdir)
        if initialised_from:
            assert f"initialised from {stage.out(initialised_from)}" in proc.stdout
        assert f"trained to step 2; checkpoints in {out}/checkpoints" in proc.stdout
        last = _metrics(out)[-1]
        assert last["step"] == 2 and math.isfinite(last["loss"]), last
        assert (pathlib.Path(out) / "checkpoints" / "2").is_dir()
    return check


def check_lora_train(stage, proc):
    out = stage.out("runs/lora")
    assert f"base weights from {stage.out('runs/molmo_7b_d')}; training rank-16 adapters" in proc.stdout
    assert f"trained to step 2; checkpoints in {out}/checkpoints" in proc.stdout
    base, run = _flat_params(stage.out("runs/molmo_7b_d")), _flat_params(out)
    for k in base:  # the base is untouched; the run adds the adapters
        np.testing.assert_array_equal(run[k], base[k], err_msg=".".join(k))
    assert any(k[-1] == "lora_b" for k in run)


def check_lora_infer(stage, proc):
    from PIL import Image
    drawn = stage.out("lora_points.png")
    assert re.fullmatch(rf"wrote {re.escape(drawn)} \(\d+ points drawn\)", _stdout_lines(proc)[-1]), proc.stdout
    assert Image.open(drawn).size == Image.open(stage.photo).size


def check_download(stage, proc):
    n = PIXMO_CAP_IMAGES
    assert _stdout_lines(proc) == [f"downloaded {n}, already present 0, failed 0, "
                                   "failed in an earlier run (not retried) 0"]
    url = f"http://127.0.0.1:{stage.server.server_address[1]}/cap/0.png"
    image = pathlib.Path(stage.out("images/")) / hashlib.sha256(url.encode()).hexdigest()
    assert image.read_bytes() == _png_bytes(_picture(24, 16, seed=3))


def check_build_pixmo_cap(stage, proc):
    assert _stdout_lines(proc) == [
        f"pixmo_cap: built dataset at {stage.out('gs_or_local/data')}/pixmo_cap/1.0.0",
        f"train: {PIXMO_CAP_IMAGES // 2} examples written, 0 records skipped",
        f"validation: {PIXMO_CAP_IMAGES // 2} examples written, 0 records skipped"]


def check_aot(topology_devices):
    def check(stage, proc):
        report = json.loads(_stdout_lines(proc)[-1])
        assert report["fits"] is True and report["oom_message"] is None, report
        assert math.prod(report["mesh"].values()) == topology_devices
        for key in ("peak_bytes_per_device", "param_bytes_per_device", "flops_per_device", "compile_seconds"):
            assert report[key] > 0, key
    return check


def check_export(stage, proc):
    from molmo_jax import weights
    from molmo_jax.weights.params import model_to_flat

    hf = pathlib.Path(stage.out("runs/demo_hf"))
    assert "export:" in proc.stdout
    assert json.loads((hf / "config.json").read_text())["model_type"] == "molmo"
    assert (hf / "model.safetensors.index.json").is_file()
    # What PyTorch loaders read back is the trained run's latest step, number for number.
    _, exported = weights.load(hf)
    got, want = model_to_flat(exported), _flat_params(stage.out("runs/ft"))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=".".join(k))


def check_molmo2_import(stage, proc):
    dst = pathlib.Path(stage.out("runs/molmo2_4b"))
    assert "import:" in proc.stdout and (dst / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((dst / "config.json").read_text())["family"] == "molmo2"


def check_molmo2_infer(stage, proc):
    from PIL import Image
    drawn = stage.out("molmo2_points.png")
    assert _stdout_lines(proc)[-1] in (f"wrote {drawn}", "wrote nothing (no points)"), proc.stdout
    if _stdout_lines(proc)[-1] != "wrote nothing (no points)":
        assert Image.open(drawn).size == Image.open(stage.photo).size


def check_molmo2_video(stage, proc):
    answer = json.loads(_stdout_lines(proc)[-1])
    # 6 frames shot at 2 fps: 3 s, sampled at the model's 2 fps: every frame, at 0.0, 0.5, ... 2.5 s
    assert answer["frame_indices"] == list(range(6)) and answer["sizes"] == [[64, 48]]
    assert answer["timestamps"] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]


def check_molmo2_export(stage, proc):
    import transformers

    from molmo_jax import weights
    from molmo_jax.weights.params import model_to_flat

    hf = pathlib.Path(stage.out("runs/molmo2_hf"))
    assert (hf / "tokenizer.json").is_file() and (hf / "preprocessor_config.json").is_file()
    model, info = transformers.Molmo2ForConditionalGeneration.from_pretrained(hf, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    got, want = model_to_flat(weights.load(hf)[1]), _flat_params(stage.out("runs/molmo2_ft"))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=".".join(k))


def check_forward(stage, proc):
    out = np.load(stage.out("/tmp/out.npz"))
    expected = np.load(GOLDEN / "models" / "qwen2_style" / "expected.npz")
    assert out["logits"].shape == expected["logits"].shape
    assert float(np.max(np.abs(out["logits"] - expected["logits"]))) <= 1e-4


def check_preprocess(stage, proc):
    out = np.load(stage.out("/tmp/inputs.npz"))
    golden = np.load(GOLDEN / "preprocess" / "img_480x640.npz")  # the original's preprocessing of it
    assert set(out) == {"input_ids", "images", "image_masks", "image_input_idx", "position_ids", "tiling"}
    np.testing.assert_array_equal(out["tiling"], golden["tiling"])
    np.testing.assert_array_equal(out["image_masks"], golden["image_masks"])
    np.testing.assert_array_equal(out["image_input_idx"], golden["image_input_idx"])
    assert np.abs(out["images"] - golden["images"]).max() <= 2e-6
    assert "Describe this image." in proc.stdout


def check_score(stage, proc):
    report = json.loads(proc.stdout)
    assert report["task"] == "vqa" and report["n"] == 2
    assert report["accuracy"] == pytest.approx((1 + 1 / 3) / 2)


def check_build_synthetic(stage, proc):
    assert _stdout_lines(proc) == [
        f"synthetic: built dataset at {stage.out('runs/data')}/synthetic_pixmo/default/1.0.0",
        "test: 200 examples written, 0 records skipped", "train: 4000 examples written, 0 records skipped",
        "validation: 200 examples written, 0 records skipped"]


# ------------------------------------------------------------------------------------------------
# The table

def _out(word):
    return lambda stage: stage.out(word)


# README word -> its stand-in, in every command. Words not listed run as written (repository paths
# such as tests/fixtures/golden/... and molmo_jax/assets/tiny_tokenizer are real).
STAND_INS: dict[str, Callable[[Stage], str]] = {
    ".venv/bin/python": lambda stage: sys.executable,        # the interpreter running the tests
    "path/to/Molmo-7B-D-0924": lambda stage: stage.released,  # tiny Molmo in the released HF layout
    "photo.jpg": lambda stage: stage.photo,                   # a 96x64 JPEG
    "my_data/": lambda stage: stage.my_data,                  # train.jsonl + 4 PNGs
    "hub/pixmo-cap": lambda stage: stage.hub_cap,             # one parquet file, URLs on 127.0.0.1
    "predictions.jsonl": lambda stage: stage.predictions,     # 2 VQA predictions
    "path/to/Molmo2-4B": lambda stage: stage.molmo2_released,  # tiny Molmo2 as save_pretrained writes it
    "frames/": lambda stage: stage.frames,                    # 6 PNG frames
    "configs/molmo2_4b_sft.py": lambda stage: "configs/molmo2_tiny_sft.py",
    # The 7B configs -> the tiny model's configs of the same stage (CPU-sized batch and length).
    "configs/molmo_7b_d_sft.py": lambda stage: "configs/tiny_sft.py",
    "configs/molmo_7b_d_pretrain.py": lambda stage: "configs/tiny_pretrain.py",
    # The demo's stage 2 -> the fine-tune rehearsal's run (tools.train, configs/tiny_sft.py, 2 steps).
    "runs/demo/stage2": _out("runs/ft"),
    # What the commands write goes to the scratch folder, under the same names.
    **{word: _out(word) for word in ("runs/molmo_7b_d", "points.png", "runs/data", "runs/ft", "images/",
                                     "gs_or_local/data", "/ckpt/run1", "runs/demo_hf", "/tmp/out.npz",
                                     "/tmp/inputs.npz", "runs/lora", "lora_points.png", "runs/molmo2_4b",
                                     "molmo2_points.png", "runs/molmo2_ft", "runs/molmo2_hf",
                                     "runs/molmo2_4b/tokenizer")},
}

# Training rehearsals: 2 steps (the tiny configs run 20), and the data kind of the 7B configs
# ("mixture": what --config.data.mixture / data_dir name) where the tiny configs, shrunk by
# base.cpu_smoke, read the synthetic set; so the data the README builds is the data that trains.
TRAIN_FLAGS = ("--config.total_steps=2", "--config.data.kind=mixture")

# Covered elsewhere, not rehearsed here.
COVERED = {
    "make demo": "tests/test_demo.py runs tools.demo (what `make demo` runs) with --quick",
    "make test": "the suite this file belongs to; CI runs it",
}


@dataclasses.dataclass(frozen=True)
class Rehearsal:
    readme: str                                   # the command as README.md writes it
    check: Callable[[Stage, subprocess.CompletedProcess], None]
    extra: tuple[str, ...] = ()                   # flags appended (the reason is next to each entry)
    after: tuple[str, ...] = ()                   # README commands whose outputs this one reads
    replace: dict = dataclasses.field(default_factory=dict)  # stand-ins for this command only
    exact_on_tpu: bool = False                    # also run verbatim (slow, needs libtpu)


_IMPORT = ".venv/bin/python -m tools.convert import path/to/Molmo-7B-D-0924 runs/molmo_7b_d"
_BUILD_VQA = ".venv/bin/python -m tools.build_data vqa --name my_data --data-dir runs/data --source my_data/"
_FINETUNE = (".venv/bin/python -m tools.train --config configs/molmo_7b_d_sft.py --workdir runs/ft "
             "--config.init_from=runs/molmo_7b_d --config.data.mixture=vqa:my_data:1.0 "
             "--config.data.tokenizer=path/to/Molmo-7B-D-0924 --config.data.data_dir=runs/data")
_LORA = (".venv/bin/python -m tools.train --config configs/molmo_7b_d_sft.py --workdir runs/lora "
         "--config.init_from=runs/molmo_7b_d --config.lora.rank=16 --config.data.mixture=vqa:my_data:1.0 "
         "--config.data.tokenizer=path/to/Molmo-7B-D-0924 --config.data.data_dir=runs/data")
_M2_IMPORT = ".venv/bin/python -m tools.convert import path/to/Molmo2-4B runs/molmo2_4b"
_M2_FINETUNE = (".venv/bin/python -m tools.train --config configs/molmo2_4b_sft.py --workdir runs/molmo2_ft "
                "--config.init_from=runs/molmo2_4b --config.data.mixture=vqa:my_data:1.0 "
                "--config.data.tokenizer=runs/molmo2_4b/tokenizer --config.data.data_dir=runs/data")
_DOWNLOAD = ".venv/bin/python -m tools.download_pixmo --source hub/pixmo-cap --images images/"
_BUILD_CAP = (".venv/bin/python -m tools.build_data pixmo_cap --data-dir gs_or_local/data --source hub/pixmo-cap "
              "--images images/")

TABLE = [
    Rehearsal(_IMPORT, check_import),
    Rehearsal(".venv/bin/python -m tools.infer --checkpoint runs/molmo_7b_d --tokenizer path/to/Molmo-7B-D-0924 "
              '--image photo.jpg --prompt "Point to the dogs." --out-image points.png', check_infer,
              after=(_IMPORT,)),
    Rehearsal(_BUILD_VQA, check_build_vqa),
    Rehearsal(_FINETUNE, check_train("runs/ft", initialised_from="runs/molmo_7b_d"), extra=TRAIN_FLAGS,
              after=(_IMPORT, _BUILD_VQA)),
    Rehearsal(_LORA, check_lora_train, extra=TRAIN_FLAGS, after=(_IMPORT, _BUILD_VQA)),
    Rehearsal(".venv/bin/python -m tools.infer --checkpoint runs/lora --tokenizer path/to/Molmo-7B-D-0924 --weights int8 "
              '--image photo.jpg --prompt "Point to the dogs." --out-image lora_points.png', check_lora_infer,
              after=(_LORA,)),
    Rehearsal(_M2_IMPORT, check_molmo2_import),
    Rehearsal(".venv/bin/python -m tools.infer --checkpoint runs/molmo2_4b --image photo.jpg "
              '--prompt "Point to the dogs." --out-image molmo2_points.png', check_molmo2_infer, after=(_M2_IMPORT,)),
    # --json: the answer's frame times and indices, what the check reads
    Rehearsal('.venv/bin/python -m tools.infer --checkpoint runs/molmo2_4b --video frames/ --fps 2 '
              '--prompt "Track the dog."', check_molmo2_video, extra=("--json",), after=(_M2_IMPORT,)),
    Rehearsal(_M2_FINETUNE, check_train("runs/molmo2_ft", initialised_from="runs/molmo2_4b"), extra=TRAIN_FLAGS,
              after=(_M2_IMPORT, _BUILD_VQA)),
    Rehearsal(".venv/bin/python -m tools.convert export runs/molmo2_ft runs/molmo2_hf --tokenizer "
              "runs/molmo2_4b/tokenizer", check_molmo2_export, after=(_M2_FINETUNE,)),
    Rehearsal(_DOWNLOAD, check_download),
    Rehearsal(_BUILD_CAP, check_build_pixmo_cap, after=(_DOWNLOAD,)),
    # Run on every host by `gcloud compute tpus tpu-vm ssh my-v5p-128 --worker=all --command "cd molmo_jax && ..."`;
    # here one process, one CPU device.
    Rehearsal(".venv/bin/python -m tools.train --config configs/molmo_7b_d_pretrain.py --workdir /ckpt/run1 "
              "--config.data.data_dir=gs_or_local/data --config.data.tokenizer=path/to/Molmo-7B-D-0924",
              check_train("/ckpt/run1"), extra=TRAIN_FLAGS, after=(_BUILD_CAP,)),
    # 72B on a v5p-512 slice -> the tiny model on 8 simulated CPU devices (tools.aot's cpu-N), with
    # test_aot.py's small program (batch 8, 64 tokens, one crop); the verbatim command runs in
    # test_aot_command_verbatim_on_tpu (slow, libtpu).
    Rehearsal(".venv/bin/python -m tools.aot --config configs/molmo_72b_sft.py --topology v5p-512 --json",
              check_aot(8), replace={"configs/molmo_72b_sft.py": lambda stage: "configs/tiny_sft.py",
                                     "v5p-512": lambda stage: "cpu-8"},
              extra=("--config.batch_size=8", "--config.seq_len=64", "--config.data.max_crops=1"),
              exact_on_tpu=True),
    Rehearsal(".venv/bin/python -m tools.convert export runs/demo/stage2 runs/demo_hf", check_export,
              after=(_FINETUNE,)),
    Rehearsal(".venv/bin/python -m tools.forward tests/fixtures/golden/models/qwen2_style "
              "--inputs tests/fixtures/golden/models/qwen2_style/inputs.npz --out /tmp/out.npz", check_forward),
    Rehearsal(".venv/bin/python -m tools.preprocess --model molmo_7b_d --tokenizer molmo_jax/assets/tiny_tokenizer "
              "--vocab-size 152064 --image tests/fixtures/golden/preprocess/img_480x640.png "
              '--prompt "Describe this image." --out /tmp/inputs.npz', check_preprocess),
    Rehearsal(".venv/bin/python -m tools.eval score --task vqa --predictions predictions.jsonl --json", check_score),
    Rehearsal(".venv/bin/python -m tools.build_data synthetic --data-dir runs/data", check_build_synthetic),
]
REHEARSALS = {normalise(r.readme): r for r in TABLE}


# ------------------------------------------------------------------------------------------------
# The tests

def test_every_readme_command_has_a_rehearsal():
    """README.md and the table name the same commands: a new README command needs a rehearsal here,
    a rehearsal of a command the README no longer shows must go."""
    in_readme = readme_commands(README.read_text())
    assert len(in_readme) == len(set(in_readme)), "a README command appears twice"
    covered = {normalise(c) for c in COVERED}
    missing = [c for c in in_readme if c not in REHEARSALS and c not in covered]
    assert not missing, "README commands without a rehearsal in tests/test_readme.py:\n" + "\n".join(missing)
    stale = [c for c in list(REHEARSALS) + sorted(covered) if c not in in_readme]
    assert not stale, "rehearsals of commands README.md no longer shows:\n" + "\n".join(stale)


def test_readme_extraction():
    """Continuations are joined, comments dropped, the diagram skipped, a gcloud line replaced by its
    remote command; an unknown block is read as commands (and so needs rehearsals)."""
    text = ("```\nmake demo    # build\n```\n```\ntools/    convert.py (it's the tree)\n```\n"
            "```\na --x 1 \\\n    --y \"two words\"\n"
            'gcloud compute tpus tpu-vm ssh pod --worker=all --command \\\n  "cd molmo_jax && b --z /w"\n```\n'
            "```\nsrc/   not a known diagram\n```\n")
    assert readme_commands(text) == ["make demo", "a --x 1 --y 'two words'", "b --z /w",
                                     "src/ not a known diagram"]


def test_readme_paths_exist_or_have_stand_ins():
    """Every path a README command names is in the repository or has a stand-in, so that no
    rehearsal reads a file that is not there or writes into the checkout."""
    pathlike = re.compile(r"/|\.(jpg|png|jsonl|npz|py|json|parquet)$")
    for command in REHEARSALS:
        rehearsal = REHEARSALS[command]
        for word in shlex.split(command):
            value = word.partition("=")[2] if word.startswith("--") else word
            if not value or not pathlike.search(value) or value in STAND_INS or value in rehearsal.replace:
                continue
            assert (ROOT / value).exists(), f"{command}: {value!r} is neither in the repository nor stood in"


def test_covered_commands_are_what_the_makefile_runs():
    makefile = (ROOT / "Makefile").read_text()
    recipe = lambda target: re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)  # noqa: E731
    assert "-m tools.demo" in recipe("demo")
    assert "-m pytest" in recipe("test") and "tests" in recipe("test")
    assert "tools.demo" in (ROOT / "tests" / "test_demo.py").read_text()


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    s = Stage(tmp_path_factory.mktemp("readme"))
    yield s
    s.close()


def _test_id(command):
    """tools.X and its subcommand or dataset, e.g. "build_data vqa"; train: its config's stage."""
    words = shlex.split(command)
    tool, rest = words[words.index("-m") + 1].removeprefix("tools."), words[words.index("-m") + 2:]
    if tool == "train":
        return "train " + rest[rest.index("--config") + 1].rsplit("_", 1)[1].removesuffix(".py")
    return f"{tool} {rest[0]}" if rest and not rest[0].startswith("-") and "/" not in rest[0] else tool


@pytest.mark.parametrize("command", list(REHEARSALS), ids=_test_id)
def test_readme_command(stage, command):
    proc = stage.rehearse(command)
    assert proc.returncode == 0, f"{shlex.join(proc.args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    REHEARSALS[command].check(stage, proc)


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, r in REHEARSALS.items() if r.exact_on_tpu], ids=_test_id)
def test_aot_command_verbatim_on_tpu(command):
    """The README's AOT command as written (only the interpreter is this one): a real TPU compile."""
    pytest.importorskip("libtpu", reason="libtpu is not installed: TPU topologies cannot be compiled for")
    argv = [sys.executable] + shlex.split(command)[1:]
    proc = run(argv, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_aot(256)(None, proc)  # v5p-512: 256 chips, the config's mesh (fsdp=-1) spans them all
