"""molmo_jax: a JAX/Flax reimplementation of Ai2's Molmo vision-language models.

Versions are pinned to a set that installs together on Python 3.11 (see docs/ and ENV notes):
jax 0.11+ and flax 0.12.9+ need Python 3.12.
"""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorstore==0.1.86",
    "grain==0.2.18",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "numpy==2.4.6",
    "ml-dtypes==0.6.0",
    "tensorflow-datasets==4.9.10",
    "importlib-resources==7.1.0",
    "protobuf==7.36.2",
    "pillow==13.0.0",
    "tokenizers==0.23.3",
    "absl-py==2.5.1",
    "tqdm==4.70.1",
    "pyarrow==26.0.1",
    "scipy==1.17.1",
    "tensorboardX==2.6.5",  # TensorBoard event files without TensorFlow
    "qwix==0.1.8",          # quantization (layers.quant)
]

EXTRAS = {
    # The PyTorch side: the converter and parity tests. torch must be pinned exactly: the CPU wheel of
    # 2.13.0 is what installs here without pulling a multi-GB CUDA build.
    "pytorch": ["torch==2.13.0", "safetensors==0.8.0"],
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "transformers==5.23.0", "peft==0.21.2"],
    # Ahead-of-time compilation for TPU topologies on a CPU host (the version jax 0.10.2 pins).
    "tpu": ["libtpu==0.0.42.1"],
}

setup(
    name="molmo_jax",
    version="0.1.0",
    description="Molmo vision-language models in JAX/Flax: training, conversion, inference.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["molmo_jax*", "input_pipeline*", "tools*", "configs*"]),
    # the bundled tokenizers (tiny and demo models): without them an installed copy cannot run the demo
    package_data={"molmo_jax": ["assets/README.md", "assets/*/*.json"]},
    install_requires=CORE,
    extras_require=EXTRAS,
)
