"""The PyTorch converter: import released / original Molmo checkpoints, export to the released HF
layout, and build a Molmo from base CLIP + LLM checkpoints. The command line is `tools.convert`.

  import_checkpoint   PyTorch Molmo (HF dir, original dir, state dict file) -> molmo_jax model dir
  export_checkpoint   molmo_jax model dir / training checkpoint -> HF layout or one state dict file
  init_from_base      HF CLIP vision dir + HF Qwen2 / OLMo-2 / OLMoE dir -> molmo_jax model dir

All of them stream (about one layer's tensors in memory), validate before writing, and write into a
temporary sibling of the destination that is renamed only when everything succeeded.
"""
from molmo_jax.convert.exporter import export_checkpoint
from molmo_jax.convert.from_base import init_from_base
from molmo_jax.convert.importer import import_checkpoint, parse_mesh

__all__ = ["import_checkpoint", "export_checkpoint", "init_from_base", "parse_mesh"]
