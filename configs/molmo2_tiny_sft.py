"""A tiny Molmo2 fine-tuned on the synthetic PixMo: runs on a CPU in seconds (tests, smoke runs)."""
from configs import base


def get_config():
    c = base.cpu_smoke(base.molmo2_sft(base.model("molmo2_tiny")))
    c.model.update(remat="none", dtype="float32")
    return c
