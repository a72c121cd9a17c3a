"""The demo's stage 2: multitask fine-tuning (pointing, counting, QA, clocks, charts) of the stage-1
result on the synthetic PixMo (see configs/demo_pretrain.py)."""
from configs import base
from configs.demo_pretrain import demo_data, demo_model


def get_config():
    c = demo_data(base.sft(demo_model()))
    c.model.llm.update(residual_dropout=0.0)  # a small model on endless data: no need to regularise
    c.total_steps = 1200
    c.checkpoint_every = 400
    for group in ("connector", "vit", "llm"):
        c.optimizer.groups[group].update(lr=2e-3, warmup=50)
    c.optimizer.frozen = ""
    return c
