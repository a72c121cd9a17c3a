"""Train Molmo: `python -m tools.train --config configs/X.py --workdir DIR [--config.key=value ...]`.

Restarting the same command resumes from the last complete checkpoint in DIR. On several hosts, run
the same command on every host: `jax.distributed` is initialised when the environment is a
multi-process one (see `multiprocess_environment`), e.g. every worker of a Cloud TPU pod slice; a
single host, a laptop or a one-task job stays a plain single-process run. Elsewhere give
--coordinator_address (or $JAX_COORDINATOR_ADDRESS), --num_processes and --process_id.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from molmo_jax import recipe

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/<model>_<stage>.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and logs go")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "call jax.distributed.initialize() (default: when the environment is a multi-process "
    "one: $JAX_COORDINATOR_ADDRESS, multislice TPU, or Open MPI / SLURM / Cloud TPU / indexed Kubernetes Job "
    "with more than one process); --nodistributed: never")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator "
                                   "(default: $JAX_COORDINATOR_ADDRESS, else read from the cluster environment)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (default: from the cluster "
                                      "environment)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's id, 0..num_processes-1 (default: from "
                                   "the cluster environment)")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "seconds to wait for every process to "
                                            "join jax.distributed")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
flags.mark_flags_as_required(["config", "workdir"])


class DistributedError(RuntimeError):
    """jax.distributed could not be set up; the message is one line meant for the user."""


# The cluster environments jax.distributed.initialize() bootstraps from (jax/_src/clusters), in the
# order it tries them: it uses the first one present, so only that one decides the process count
# here too. mpi4py is left out because jax only uses it when asked by name.
_CLUSTERS = (("OmpiCluster", "Open MPI"), ("SlurmCluster", "SLURM"), ("GkeTpuCluster", "TPU on GKE"),
             ("GceTpuCluster", "Cloud TPU VM"), ("K8sCluster", "Kubernetes indexed Job"))


def multiprocess_environment():
    """Why this run should start jax.distributed ("SLURM, 4 processes", ...), or None for one process.

    Explicit settings win: a coordinator address (--coordinator_address or $JAX_COORDINATOR_ADDRESS,
    which jax reads) or a multislice TPU ($MEGASCALE_COORDINATOR_ADDRESS). Otherwise jax's own cluster
    detection is asked, with jax's classes (so the rules are exactly the ones initialize() will use),
    and a cluster counts only with more than one process: `srun -n1`, `mpirun -np 1` or a single-host
    TPU VM train alone. On a Cloud TPU VM this reads the metadata server (agent-worker-number and
    worker-network-endpoints: one endpoint per host of the slice), as jax does.
    """
    env = os.environ
    if _COORDINATOR.value:
        return "--coordinator_address"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "$JAX_COORDINATOR_ADDRESS"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "multislice TPU (MEGASCALE_COORDINATOR_ADDRESS)"
    try:
        from jax._src import clusters  # private, so every use below tolerates its absence
    except ImportError:
        return None
    for class_name, label in _CLUSTERS:
        cluster = getattr(clusters, class_name, None)
        if cluster is None:
            continue
        if class_name == "K8sCluster" and "JOB_COMPLETION_INDEX" not in env:
            # jax's Kubernetes check talks to the API server (and warns without the `kubernetes`
            # package) in every pod, but only indexed Jobs have process ids to bootstrap from.
            continue
        try:
            if not cluster.is_env_present():
                continue
            count = int(cluster.get_process_count())
        except Exception as e:  # noqa: BLE001 - e.g. an unreachable TPU metadata server
            raise DistributedError(f"{label}: could not read the number of processes ({_one_line(e)}); "
                                   f"pass --distributed or --nodistributed") from e
        return f"{label}, {count} processes" if count > 1 else None
    return None


def distributed_reason(flag: bool | None):
    """Why to start jax.distributed (--distributed or the environment), or None: --nodistributed skips
    the detection altogether (so it also gets past an unreachable TPU metadata server)."""
    if flag is False:
        return None
    return multiprocess_environment() or ("--distributed" if flag else None)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def start_distributed(reason: str) -> None:
    """jax.distributed.initialize() with the flags given (the rest from the environment); any failure
    becomes one DistributedError line instead of jax's traceback."""
    import threading

    import jax

    timeout = _DISTRIBUTED_TIMEOUT.value
    address = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS") or "from the environment"
    joined = threading.Event()

    def watchdog():
        # Processes that never join (process 0 not started, a wrong address or process count) are
        # not a Python exception in jax: its coordination client aborts the process with a C++
        # stack trace when its own deadline passes. So this thread stops the process first, with
        # one line (jax's deadline is set later than ours; connect() releases the GIL meanwhile).
        if not joined.wait(timeout):
            who = f"coordinator {address}"
            try:  # what jax resolved (from the flags or the cluster), when it got that far
                from jax._src.distributed import global_state as state
                if state.coordinator_address:
                    who = (f"process {state.process_id} of {state.num_processes}, "
                           f"coordinator {state.coordinator_address}")
            except Exception:  # noqa: BLE001 - private module; the message must come out regardless
                pass
            print(f"error: jax.distributed.initialize(): not every process joined within {timeout} s ({who}; "
                  f"{reason}): start all of them with the same coordinator address and process count, or raise "
                  f"--distributed_timeout", file=sys.stderr, flush=True)
            os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value, initialization_timeout=timeout + 60)
    except Exception as e:  # noqa: BLE001 - jax raises ValueError, RuntimeError, JaxRuntimeError, ...
        hint = ""
        if isinstance(e, ValueError) and "defined" in str(e):
            hint = ("; outside Open MPI, SLURM, Cloud TPU or an indexed Kubernetes Job give --coordinator_address "
                    "(or $JAX_COORDINATOR_ADDRESS), --num_processes and --process_id")
        raise DistributedError(f"jax.distributed.initialize() failed ({reason}; coordinator {address}): "
                               f"{_one_line(e)}{hint}") from e
    finally:
        joined.set()


class _CountingIterator:
    """Passes batches through and counts the examples this process loaded (printed at the end)."""

    def __init__(self, data):
        self.data, self.batches, self.examples = data, 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.data)
        self.batches += 1
        self.examples += len(batch["input_ids"])
        return batch

    def get_state(self):
        return self.data.get_state()

    def set_state(self, state):
        self.data.set_state(state)


def make_evaluator(config):
    """Validation loss and a small generation evaluation, every config.eval_every steps (0 = off)."""
    if not config.get("eval_every") or config.data.kind == "random":
        return None
    import itertools

    import input_pipeline
    from input_pipeline.evaluation import make_eval_examples
    from molmo_jax import evaluate
    from molmo_jax.preprocess import Molmo2Tokenizer, MolmoTokenizer

    if config.model.get("family", "molmo") == "molmo2":
        tokenizer = Molmo2Tokenizer(input_pipeline.tokenizer_dir(config))
    else:
        tokenizer = MolmoTokenizer(input_pipeline.tokenizer_dir(config), config.model.llm.vocab_size)
    examples = []
    if config.data.kind == "synthetic":
        for task in config.eval_tasks:
            # The sizes and options of the training data: the same dataset, not a second build.
            examples += list(make_eval_examples(task, "validation", config.data.data_dir or None,
                                                limit=config.eval_examples,
                                                split_sizes=input_pipeline.synthetic_split_sizes(config),
                                                options=input_pipeline.synthetic_options(config)))
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

    try:
        reason = distributed_reason(_DISTRIBUTED.value)
        if reason is not None:
            start_distributed(reason)
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO

    import input_pipeline
    from molmo_jax import trainer as trainer_lib

    config = _CONFIG.value
    problems = recipe.validate(config, jax.device_count())
    if problems:  # before anything is built, loaded or written to the workdir
        print(f"error: --config {config_flags.get_config_filename(flags.FLAGS['config'])}: {'; '.join(problems)}",
              file=sys.stderr)
        return 2
    index, count = jax.process_index(), jax.process_count()
    try:  # the data first: a wrong dataset name or an unbuilt dataset is one line, before any work
        data = _CountingIterator(input_pipeline.make_train_iterator(config, index, count))
    except (KeyError, FileNotFoundError, ValueError) as e:
        print(f"error: training data: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    if config.lora.rank and not config.init_from:
        print("error: lora.rank > 0 trains adapters on a base model: give it with --config.init_from=CHECKPOINT",
              file=sys.stderr)
        return 2
    try:
        trainer = trainer_lib.Trainer(config, _WORKDIR.value)
    except ValueError as e:  # settings the model cannot be built with (lora.targets, lora.rank, ...)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if config.lora.rank:  # adapters: the base always comes from init_from, then the adapters resume
        trainer.load_params(trainer_lib.model_params_from_checkpoint(config.init_from))
        n = sum(a.size for a in jax.tree.leaves(trainer.setup.split(trainer.params)[0]))
        print(f"base weights from {config.init_from}; training rank-{config.lora.rank} adapters ({n:,} parameters)")
        trainer.restore_latest()
    elif not trainer.restore_latest() and config.init_from:
        trainer.load_params(trainer_lib.model_params_from_checkpoint(config.init_from))
        print(f"initialised from {config.init_from}")
    start = trainer.step
    try:
        step = trainer.fit(data, progress=_PROGRESS.value, evaluator=make_evaluator(config))
    except trainer_lib.TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if count > 1:  # every host says what it loaded: its share of each global batch, never all of it
        print(f"process {index} of {count} ({jax.local_device_count()} of {jax.device_count()} devices): "
              f"loaded {data.examples} examples for steps {start + 1}-{step} "
              f"({data.examples // max(data.batches, 1)} of every {config.batch_size})")
    if index == 0:
        print(f"trained to step {step}; checkpoints in {os.path.join(_WORKDIR.value, 'checkpoints')}, "
              f"metrics in {os.path.join(_WORKDIR.value, 'metrics.jsonl')}")
    return 0


if __name__ == "__main__":
    try:  # an unknown --config.KEY fails inside flag parsing with a traceback: name it first
        recipe.check_overrides()
    except recipe.RecipeError as e:
        sys.exit(f"error: {e}")
    app.run(lambda argv: sys.exit(main(argv)))
