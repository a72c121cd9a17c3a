"""molmo2_4b fine-tuning: the Molmo2 recipe of configs/base.py (molmo2_sft)."""
from configs import base


def get_config():
    return base.molmo2_sft(base.model("molmo2_4b"))
