"""An installed (non-editable) molmo_jax carries its bundled tokenizers: the wheel holds the assets."""
import glob
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_holds_the_bundled_tokenizers(tmp_path):
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    src.mkdir()
    shutil.copy(os.path.join(ROOT, "setup.py"), src / "setup.py")
    for package in ("molmo_jax", "input_pipeline", "tools", "configs"):
        shutil.copytree(os.path.join(ROOT, package), src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    names = set(zipfile.ZipFile(glob.glob(str(tmp_path / "dist" / "*.whl"))[0]).namelist())
    for tokenizer in ("tiny_tokenizer", "demo_tokenizer"):
        for f in os.listdir(os.path.join(ROOT, "molmo_jax", "assets", tokenizer)):
            assert f"molmo_jax/assets/{tokenizer}/{f}" in names
