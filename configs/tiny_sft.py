"""A tiny Molmo, stage 2: runs on a CPU in seconds (tests, smoke runs)."""
from configs import base


def get_config():
    c = base.sft(base.model("tiny"))
    c.batch_size = 4
    c.seq_len = 512
    c.total_steps = 20
    c.log_every = 1
    c.checkpoint_every = 10
    c.data.update(kind="random")
    c.optimizer.groups.connector.update(lr=1e-3, warmup=5)
    c.optimizer.groups.vit.update(lr=1e-3, warmup=5)
    c.optimizer.groups.llm.update(lr=1e-3, warmup=5)
    return c
