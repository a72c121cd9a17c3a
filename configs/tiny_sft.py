"""A tiny Molmo, stage 2 (sft): runs on a CPU in seconds (tests, smoke runs)."""
from configs import base


def get_config():
    return base.cpu_smoke(base.sft(base.model("tiny")))
