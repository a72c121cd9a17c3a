"""Defaults shared by every training config; `configs/<model>_<stage>.py` override what differs.

The numbers of the released recipe (docs/architecture.md#stages) live in `pretrain()` and `sft()`.
"""
import ml_collections

from molmo_jax import config as model_configs
from molmo_jax import optim
from molmo_jax.layers import lora


def base(model: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = model
    c.stage = stage
    c.init_from = ""              # checkpoint to start from (stage 2: the stage-1 result)
    c.seed = 6198                 # the original's global seed
    c.total_steps = 1000
    c.batch_size = 8              # global, across all processes
    c.grad_accum_steps = 1        # micro-batches per step (all share the full batch's loss normaliser)
    c.grad_accum_dtype = "float32"  # the gradient accumulator: float32 as the original reduces; or bfloat16
    c.seq_len = 2304
    c.max_loss_tokens = 0         # per micro-batch; 0 = every position (no cap)
    c.loss_chunk_tokens = 0       # > 0: the output head and softmax run on this many positions at a time
    c.optimizer = optim.optimizer_config()
    c.lora = lora.lora_config()   # low-rank adapters: lora.rank > 0 trains them alone on init_from's weights
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3        # keep the last N ...
    c.keep_every = 0              # ... and every K-th step forever (0 = none)
    c.async_checkpointing = True
    c.max_bad_steps = 10          # stop after this many non-finite steps in a row
    c.eval_every = 0              # validation loss + a small generation eval every N steps (0 = off)
    c.eval_batches = 4            # validation batches for the loss
    c.eval_tasks = ("synthetic_pointing", "synthetic_counting", "synthetic_qa")  # kind "synthetic"
    c.eval_examples = 16          # examples per task
    c.peak_flops_per_device = 0.0  # for the MFU estimate; 0 = guess from the device kind
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
    c.data = ml_collections.ConfigDict(dict(
        kind="random",            # "random" (no files), "synthetic" (built on first use) or "mixture"
        data_dir="",              # TFDS data dir ("" = $MOLMO_JAX_DATA_DIR or ~/.cache/molmo_jax/data)
        mixture="",               # mixture name or "name:rate,..." (kind "mixture")
        tokenizer="",             # tokenizer directory ("" = the bundled tiny one, tiny/demo models only)
        seed=95818 if stage == "pretrain" else 50189,
        max_crops=model.image.max_crops,
        max_images=1,             # Molmo2: images a record may hold (each up to max_crops crops)
        max_frames=0,             # Molmo2: frames of a video record (0 = no video records)
        pack_records=1,           # Molmo2: records drawn per row and packed into it while they fit (1 = one)
        seq_buckets=(),           # padded sequence lengths (() = just seq_len)
        num_workers=0,            # grain worker processes for preprocessing
        worker_buffer=2,
        drop_missing=False,       # leave unbuilt datasets out of a mixture instead of failing
        synthetic_split_sizes="",  # e.g. "train=4000,validation=200,test=200" ("" = builder default)
        synthetic_options="",     # renderer options, e.g. "grid=4,max_objects=4" ("" = default)
    ))
    return c


def pretrain(model) -> ml_collections.ConfigDict:
    """Stage 1, dense-caption pretraining on PixMo-Cap (docs/architecture.md#stages)."""
    c = base(model, "pretrain")
    c.model.llm.update(residual_dropout=0.0, response_residual_dropout=0.1)
    c.batch_size = 128
    c.seq_len = 2304
    c.total_steps = 4 * (712_000 + 127) // 128  # ~4 epochs of ~712k PixMo-Cap images
    c.optimizer = optim.optimizer_config(connector=dict(lr=2e-4, warmup=200), vit=dict(lr=6e-6, warmup=2000),
                                         llm=dict(lr=2e-5, warmup=2000))
    c.data.update(kind="mixture", mixture="pixmo_cap_with_transcripts")
    return c


def sft(model) -> ml_collections.ConfigDict:
    """Stage 2, multitask supervised fine-tuning on the PixMo + academic mixture (docs/architecture.md#stages)."""
    c = base(model, "sft")
    c.model.llm.update(residual_dropout=0.1, response_residual_dropout=0.0)
    c.batch_size = 256
    c.seq_len = 2304
    c.total_steps = 30_000
    c.optimizer = optim.optimizer_config(connector=dict(lr=5e-6, warmup=200), vit=dict(lr=5e-6, warmup=200),
                                         llm=dict(lr=1e-5, warmup=200))
    c.data.update(kind="mixture", mixture="3.2-synthetic")
    return c


def molmo2_sft(model) -> ml_collections.ConfigDict:
    """Molmo2 fine-tuning (docs/architecture.md#molmo2-training-data): Molmo's stage-2 recipe at 128
    sequences of 16,384 tokens a step, Molmo2's fine-tuning size as we read its technical report, one image
    per sequence (no packing yet) and no residual dropout; data: the PixMo mixture unless a mixture of
    yours is named, and `data.tokenizer` must name the checkpoint's tokenizer folder."""
    c = sft(model)
    c.model.llm.update(residual_dropout=0.0)
    c.batch_size = 128
    c.seq_len = 16384
    c.model.remat = "full"
    c.model.dtype = "bfloat16"
    return c


def cpu_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a stage config to run on a CPU in seconds (the `tiny_*` configs)."""
    c.batch_size = 4
    c.seq_len = 512
    c.total_steps = 20
    c.log_every = 1
    c.checkpoint_every = 10
    c.data.update(kind="synthetic")
    for group in ("connector", "vit", "llm"):
        c.optimizer.groups[group].update(lr=1e-3, warmup=5)
    return c


def model(name: str) -> ml_collections.ConfigDict:
    return model_configs.get_config(name)
