"""A tiny Molmo, stage 1 (pretrain): runs on a CPU in seconds (tests, smoke runs)."""
from configs import base


def get_config():
    return base.cpu_smoke(base.pretrain(base.model("tiny")))
