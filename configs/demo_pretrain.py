"""The demo's stage 1: a small Molmo from scratch on the synthetic PixMo's captions (CPU, minutes).

`make demo` runs this, then configs/demo_sft.py, then evaluates and exports (tools/demo.py).
"""
from configs import base

# Scenes the demo model can learn to point at within minutes: up to 4 shapes whose centres sit on a
# 4 x 4 grid aligned with the pooled image tokens (input_pipeline/synthetic.py, option `grid`), and
# at least two kinds of shape in every scene with more than one object (`min_types`), so that
# "point at every object" is never the right answer: the model must pick the ones a question names.
# One plain background: with five tinted ones the model named the objects' colour after the tint.
SYNTHETIC_OPTIONS = ("grid=4,max_objects=4,min_types=2,image_size=112,qa_per_image=1,"
                     "kinds=shapes+clock+chart,kind_weights=0.8+0.1+0.1,backgrounds=light grey")


def demo_model():
    m = base.model("demo")
    m.init = "fan_in"            # from scratch: keep activations O(1) through the layers
    m.image.max_crops = 1        # 112-px images need one high-res crop (plus the global view)
    # Each object sits centred on one 2x2 pooling window, a quarter of it in each patch; attention
    # pooling sums the quarters (a circle's and a square's look alike), stacking keeps them apart
    # (scratch runs with the plain background, two seeds each: pointing F1 0.46 mean vs 0.43).
    m.connector.pooling = "stack"
    m.scan_unroll = 8            # 4-layer ViT and LLM: the unrolled step is ~15% faster on a CPU
    return m


def demo_data(c):
    c.data.update(kind="synthetic", synthetic_options=SYNTHETIC_OPTIONS,
                  synthetic_split_sizes="train=4000,validation=100,test=200")
    c.batch_size = 16
    c.seq_len = 256              # stage 2: an image's conversations with the demo tokenizer, at most ~250
    c.log_every = 10
    c.keep_checkpoints = 1
    c.mesh.update(data=1, fsdp=-1)
    return c


def vision_lr(c, llm_lr=2e-3, vision_lr=2e-4, warmup=30):
    """The LLM learns fast; the ViT and connector get 10x less. At the LLM's rate their weights grow
    until the image features dwarf the text embeddings (the LLM's RMSNorm hides the growth from the
    loss), their gradients vanish and the model stops looking at the image."""
    for group, lr in (("connector", vision_lr), ("vit", vision_lr), ("llm", llm_lr)):
        c.optimizer.groups[group].update(lr=lr, warmup=warmup)


def get_config():
    c = demo_data(base.pretrain(demo_model()))
    c.seq_len = 144              # image tokens + caption + transcript of a 112-px scene: at most ~140
    c.total_steps = 400          # where the model learns to look: colours, shapes, coarse positions
    c.checkpoint_every = 400
    vision_lr(c)
    c.optimizer.frozen = ""      # a from-scratch embedding must learn too
    return c
