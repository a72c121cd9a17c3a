"""Test set-up: CPU only, 8 simulated devices for sharding tests, absl flags parsed (grain needs it)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pathlib  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache for the whole run (xdist workers and the subprocesses that tests
# start): the same programs compiled again are loaded instead.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "molmo_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


def _torchvision_for_tests():
    """transformers' Molmo2 processors (the reference of test_molmo2_preprocess.py) need torchvision. The one
    built for torch 2.13 on PyPI is a CUDA build which, installed in the environment, breaks every
    transformers model import; `make install` puts it in .venv/test-torchvision (or set
    MOLMO_JAX_TEST_TORCHVISION), put on sys.path here before anything imports transformers. Its C++ ops
    cannot load next to the CPU-only torch, and its import then fails declaring fake kernels for two of them;
    Molmo2 uses only its Python resize, so those two op schemas are declared for it."""
    import importlib.util
    import sys

    folder = os.environ.get("MOLMO_JAX_TEST_TORCHVISION", os.path.join(sys.prefix, "test-torchvision"))
    if os.path.isdir(folder) and folder not in sys.path:
        sys.path.append(folder)
    if importlib.util.find_spec("torchvision") is None:
        return []
    import torch
    try:
        import torchvision  # noqa: F401
        return []
    except RuntimeError:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811
    return [lib]  # the schemas live as long as this object


_TORCHVISION_OPS = _torchvision_for_tests()

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"


@pytest.fixture(scope="session")
def golden_dir():
    return GOLDEN
