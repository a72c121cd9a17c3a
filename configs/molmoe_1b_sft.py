"""molmoe_1b stage sft: the original's recipe (see configs/base.py)."""
from configs import base


def get_config():
    c = base.sft(base.model("molmoe_1b"))
    c.model.remat = "full"
    c.model.dtype = "bfloat16"   # bf16 compute, float32 parameters and optimizer state
    return c
