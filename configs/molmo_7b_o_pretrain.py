"""molmo_7b_o stage pretrain: the original's recipe (see configs/base.py)."""
from configs import base


def get_config():
    c = base.pretrain(base.model("molmo_7b_o"))
    c.model.remat = "full"
    c.model.dtype = "bfloat16"   # bf16 compute, float32 parameters and optimizer state
    return c
