"""Train Molmo: `python -m tools.train --config configs/X.py --workdir DIR [--config.key=value ...]`.

Restarting the same command resumes from the last complete checkpoint in DIR. On several hosts,
run it on every host (jax.distributed is initialised from the environment, e.g. on Cloud TPU).
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/<model>_<stage>.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and logs go")
_DISTRIBUTED = flags.DEFINE_bool("distributed", None, "call jax.distributed.initialize() "
                                 "(default: when JAX_COORDINATOR_ADDRESS or a TPU pod environment is set)")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
flags.mark_flags_as_required(["config", "workdir"])


def make_evaluator(config):
    """Validation loss and a small generation evaluation, every config.eval_every steps (0 = off)."""
    if not config.get("eval_every") or config.data.kind == "random":
        return None
    import itertools

    import input_pipeline
    from input_pipeline.evaluation import make_eval_examples
    from molmo_jax import evaluate
    from molmo_jax.preprocess import MolmoTokenizer

    tokenizer = MolmoTokenizer(input_pipeline.tokenizer_dir(config), config.model.llm.vocab_size)
    examples = []
    if config.data.kind == "synthetic":
        for task in config.eval_tasks:
            examples += list(make_eval_examples(task, "validation", config.data.data_dir or None,
                                                limit=config.eval_examples, options=input_pipeline.synthetic_options(config)))
    settings = evaluate.EvalSettings(batch_size=min(16, config.batch_size), seq_buckets=(config.seq_len,))

    def run(model):
        out = {}
        loader = input_pipeline.make_loader(config, split="validation")
        try:
            out["val_loss"] = evaluate.mean_loss(model, itertools.islice(loader, config.eval_batches))
        finally:
            loader.close()
        if examples:
            _, results = evaluate.run(model, tokenizer, examples, settings)
            for task, metrics in results.items():
                out.update({f"{task}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        return out
    return run


def main(argv):
    del argv
    import jax

    distributed = _DISTRIBUTED.value
    if distributed is None:
        distributed = bool(os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
    if distributed:
        jax.distributed.initialize()
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO

    import input_pipeline
    from molmo_jax import trainer as trainer_lib

    config = _CONFIG.value
    trainer = trainer_lib.Trainer(config, _WORKDIR.value)
    if not trainer.restore_latest() and config.init_from:
        trainer.load_params(trainer_lib.model_params_from_checkpoint(config.init_from))
        print(f"initialised from {config.init_from}")
    data = input_pipeline.make_train_iterator(config, jax.process_index(), jax.process_count())
    try:
        step = trainer.fit(data, progress=_PROGRESS.value, evaluator=make_evaluator(config))
    except trainer_lib.TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(f"trained to step {step}; checkpoints in {os.path.join(_WORKDIR.value, 'checkpoints')}, "
              f"metrics in {os.path.join(_WORKDIR.value, 'metrics.jsonl')}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
