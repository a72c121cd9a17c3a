"""The demo's stage 2: multitask fine-tuning (pointing, counting, QA, clocks, charts) of the stage-1
result on the synthetic PixMo (see configs/demo_pretrain.py)."""
from configs import base
from configs.demo_pretrain import demo_data, demo_model, vision_lr


def get_config():
    c = demo_data(base.sft(demo_model()))
    c.model.llm.update(residual_dropout=0.0)  # a small model on endless data: no need to regularise
    c.batch_size = 8             # more, smaller steps: the same examples, twice the updates, learn faster
    c.total_steps = 1600
    c.checkpoint_every = 800
    vision_lr(c, warmup=50)
    c.optimizer.frozen = ""
    return c
