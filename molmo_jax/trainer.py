"""Sharded training through both stages (docs/architecture.md#6-training): one flat loop, big_vision style.

State = (params, opt_state) as plain nested dicts of arrays, sharded on the mesh by the logical
rules of `molmo_jax.sharding`; the step is one `jax.jit` with donated buffers. Checkpoints are
orbax `CheckpointManager` steps holding `params`, `opt_state` and `meta` (step, data iterator state,
bad-step counters); the dropout RNG is derived from (seed, step), so a resumed run repeats an
uninterrupted one bit for bit.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import ml_collections
from flax import nnx, traverse_util

from molmo_jax.analysis import flops as flops_lib
from molmo_jax import losses
from molmo_jax.layers import lora, quant
from molmo_jax import models as model_lib
from molmo_jax import optim
from molmo_jax import sharding
from molmo_jax.train_logging import MetricsWriter, Progress

log = logging.getLogger(__name__)



class TrainingStopped(RuntimeError):
    """Raised when training cannot go on (e.g. too many non-finite steps in a row)."""


# Models up to this many parameters are initialised on the host and then placed (fast to compile);
# bigger ones are created inside jit directly in their shardings, so no host holds the full model.
HOST_INIT_MAX_PARAMS = 50_000_000


def init_params(cfg_model, mesh, seed: int, shardings, host_init_max_params: int = HOST_INIT_MAX_PARAMS):
    """Parameters in their shardings (a pure dict)."""
    def create():
        return nnx.to_pure_dict(nnx.state(model_lib.create_model(cfg_model, seed)))

    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(
        nnx.to_pure_dict(nnx.state(model_lib.abstract_model(cfg_model)))))
    if n <= host_init_max_params:
        return jax.device_put(create(), shardings)
    with sharding.use_mesh(mesh):
        return jax.jit(create, out_shardings=shardings)()


def release_host_memory():
    """Hand the host memory freed since the last call back to the OS (glibc's `malloc_trim`). On a
    CPU backend, initialising or loading parameters leaves hundreds of MB of freed buffers in the
    allocator's heap (0.5 GB at bench-s), which would otherwise stay resident through training
    underneath every step's own buffers. Elsewhere it does nothing."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def like_params(tree, param_shardings, default):
    """Shardings for an optimizer-state tree: a leaf whose trailing dict keys name a parameter of
    the same shape (Adam's moments) is sharded like it; anything else gets `default`."""
    flat = {}
    for path, sh in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        flat[tuple(k.key for k in path)] = sh

    def pick(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for i in range(len(keys)):
            sh = flat.get(keys[i:])
            if sh is not None and len(sh.spec) <= len(leaf.shape):
                return sh
        return default
    return jax.tree_util.tree_map_with_path(pick, tree)


def trainable_split(config):
    """(split, join): `split(params) -> (trainable, fixed)` and its inverse, as pure dicts. With
    adapters (config.lora.rank > 0) only the adapters train and the base is fixed; otherwise every
    parameter is in `trainable` (frozen groups get zero updates from the optimizer instead)."""
    if not lora.enabled(config.model):
        return (lambda params: (params, {})), (lambda trainable, fixed: trainable)

    def split(params):
        flat = traverse_util.flatten_dict(params)
        return (traverse_util.unflatten_dict({p: v for p, v in flat.items() if lora.is_adapter(p)}),
                traverse_util.unflatten_dict({p: v for p, v in flat.items() if not lora.is_adapter(p)}))

    def join(trainable, fixed):
        return traverse_util.unflatten_dict(traverse_util.flatten_dict(fixed) | traverse_util.flatten_dict(trainable))
    return split, join


def make_train_step(config, graphdef, abstract, tx, schedules, labels):
    """The jitted step: micro-batch gradient accumulation, the global-weight-normalised loss,
    per-group clipping (inside tx), and skipping of non-finite updates. Gradients, optimizer state
    and updates cover the trainable parameters only (see `trainable_split`)."""
    model_cfg = config.model
    split, join = trainable_split(config)
    accum = config.grad_accum_steps
    acc_dtype = jnp.dtype(config.get("grad_accum_dtype", "float32"))
    if acc_dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"grad_accum_dtype={config.grad_accum_dtype!r}; choose 'float32' or 'bfloat16'")
    frozen = jax.tree.map(lambda l: l == "frozen", labels)
    if lora.enabled(model_cfg):  # the base is fixed; every adapter trains
        frozen = {}
    use_dropout = (any(model_cfg.llm[k] > 0 for k in ("residual_dropout", "response_residual_dropout",
                                                        "attention_dropout"))
                   or model_cfg.connector.image_feature_dropout > 0)

    def merge(params):
        if frozen:
            params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
        state = jax.tree.map(lambda x: x, abstract)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)

    def micro_loss(trainable, fixed, mb, key, normalizer):
        return losses.training_loss(merge(join(trainable, fixed)), mb, max_loss_tokens=config.max_loss_tokens,
                                    normalizer=normalizer, dropout_rng=key if use_dropout else None,
                                    loss_chunk_tokens=config.get("loss_chunk_tokens", 0))

    def step(all_params, opt_state, batch, step_no):
        params, fixed = split(all_params)
        key = jax.random.fold_in(jax.random.key(config.seed), step_no)
        weights = jnp.where(batch["target_tokens"] < 0, 0.0, jnp.maximum(batch["loss_masks"], 0.0))
        normalizer = jnp.sum(weights)  # the global batch's weight, shared by micro-batches
        micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def body(acc, inputs):
            mb, i = inputs
            (_, aux), grads = grad_fn(params, fixed, mb, jax.random.fold_in(key, i), normalizer)
            grads_acc, aux_acc = acc
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(acc_dtype), grads_acc, grads)
            return (grads_acc, jax.tree.map(jnp.add, aux_acc, aux)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, acc_dtype), params)
        aux0 = dict(loss=0.0, z_loss=0.0, weight=0.0, dropped_loss_tokens=0)
        aux0 = jax.tree.map(jnp.asarray, aux0)
        (grads, aux), _ = jax.lax.scan(body, (zeros, aux0), (micro, jnp.arange(accum)))
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
        norms = optim.group_grad_norms(grads, labels)
        finite = jnp.isfinite(aux["loss"] + aux["z_loss"])
        for n in norms.values():
            finite &= jnp.isfinite(n)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics = dict(aux, skipped=~finite)
        count = step_no  # the optimizer's count before this update equals the step number
        for name, n in norms.items():
            metrics[f"grad_norm/{name}"] = n
            metrics[f"lr/{name}"] = schedules[name](count)
        return join(keep(new_params, params), fixed), keep(new_opt, opt_state), metrics

    return step


@dataclasses.dataclass
class StepSetup:
    """Everything the training step needs except the arrays themselves: also what ahead-of-time
    compilation (tools.aot) lowers, with ShapeDtypeStructs in place of arrays."""
    graphdef: object
    abstract: object            # abstract nnx State of the model
    param_shardings: dict       # pure dict of NamedSharding
    opt_shardings: object
    replicated: object
    tx: object
    schedules: dict
    labels: dict
    step: object                # the jitted step (params, opt_state, batch, step_no)
    split: object               # params -> (trainable, fixed), see trainable_split

    def abstract_params(self):
        shapes = nnx.to_pure_dict(self.abstract)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                            self.param_shardings)

    def abstract_opt_state(self):
        shapes = jax.eval_shape(self.tx.init, self.split(nnx.to_pure_dict(self.abstract))[0])
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                            self.opt_shardings)


def with_adapters(config):
    """`config` whose model carries the training config's `lora` section when adapters are on."""
    if config.get("lora") is not None and config.lora.rank and not lora.enabled(config.model):
        with config.unlocked():
            config.model.lora = ml_collections.ConfigDict(config.lora.to_dict())
            config.model.lora.base = config.model.lora.base or config.init_from
            if config.lora.base_weights in ("int8", "int4"):  # QLoRA: the frozen base stored quantized
                config.model.quant = quant.quant_config(config.lora.base_weights, config.lora.group)
    return config


def build_step(config, mesh) -> StepSetup:
    config = with_adapters(config)
    graphdef, abstract = nnx.split(model_lib.abstract_model(config.model))
    param_sh = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh))
    trainable, _ = trainable_split(config)[0](nnx.to_pure_dict(abstract))
    make_tx, schedules = optim.make_optimizer(config.optimizer, config.total_steps)
    labels = optim.group_labels(trainable, config.optimizer)
    tx = make_tx(trainable)
    # Optimizer moments are sharded like their parameters; counters are replicated.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_sh = like_params(jax.eval_shape(tx.init, trainable), param_sh, replicated)
    step_fn = make_train_step(config, graphdef, abstract, tx, schedules, labels)
    # Pinned output shardings: without them XLA may pick other layouts for the updated state.
    step = jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=(param_sh, opt_sh, replicated))
    return StepSetup(graphdef, abstract, param_sh, opt_sh, replicated, tx, schedules, labels, step,
                     trainable_split(config)[0])


class Trainer:
    def __init__(self, config, workdir: str, mesh=None):
        self.config = config
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.mesh = mesh if mesh is not None else sharding.make_mesh(dict(config.mesh))
        self.is_main = jax.process_index() == 0
        self.setup = build_step(config, self.mesh)
        self.graphdef, self.abstract = self.setup.graphdef, self.setup.abstract
        self.param_shardings = self.setup.param_shardings
        self.params = init_params(config.model, self.mesh, config.seed, self.param_shardings)
        with sharding.use_mesh(self.mesh):
            self.opt_state = jax.jit(self.setup.tx.init, out_shardings=self.setup.opt_shardings)(
                self.setup.split(self.params)[0])
        release_host_memory()
        self._step = self.setup.step
        self.step = 0
        self.data_state = None
        self.bad_total = 0
        self.bad_in_row = 0
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.keep_checkpoints, keep_period=config.keep_every or None,
                enable_async_checkpointing=config.async_checkpointing, create=True),
            item_names=("params", "opt_state", "meta"))
        if self.is_main:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.model.to_json_best_effort(indent=1))

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, force: bool = False):
        if self.step in self.manager.all_steps():
            return  # already saved (a periodic save at the step where training ended)
        meta = dict(step=self.step, data_state=self.data_state, bad_total=self.bad_total,
                    bad_in_row=self.bad_in_row)
        # With adapters the checkpoint holds them alone; the model config names the base they sit on.
        self.manager.save(self.step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(self.setup.split(self.params)[0]),
            opt_state=ocp.args.StandardSave(self.opt_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore_latest(self) -> bool:
        """Resume from the newest checkpoint that restores. A damaged one (a file missing or
        truncated) is named in a warning and moved aside to `<step>.damaged`, never deleted, and the
        one before it is tried; False when there is no checkpoint at all."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return False
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
        trainable, fixed = self.setup.split(self.params)
        for step in steps:
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract(trainable)),
                    opt_state=ocp.args.StandardRestore(abstract(self.opt_state)),
                    meta=ocp.args.JsonRestore()))
                break
            except Exception as e:  # orbax raises assorted errors for a damaged step directory
                self._set_aside(step, e)
        else:
            raise TrainingStopped(f"none of the checkpoints in {self.manager.directory} restores (steps "
                                  f"{', '.join(map(str, steps))}, moved aside as <step>.damaged); remove them to "
                                  "start over")
        self.params = trainable_split(self.config)[1](restored["params"], fixed)
        self.opt_state = restored["opt_state"]
        meta = restored["meta"]
        self.step, self.data_state = int(meta["step"]), meta.get("data_state")
        self.bad_total, self.bad_in_row = int(meta.get("bad_total", 0)), int(meta.get("bad_in_row", 0))
        log.info("resumed from step %d", self.step)
        return True

    def _set_aside(self, step: int, error: Exception):
        directory = os.path.join(str(self.manager.directory), str(step))
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        log.warning("checkpoint step %d (%s) cannot be restored: %s; moved to %s.damaged, trying the one before",
                    step, directory, first, directory)
        print(f"warning: checkpoint step {step} ({directory}) cannot be restored ({first}); moved to "
              f"{directory}.damaged and not deleted; trying the one before", file=sys.stderr)
        if self.is_main and os.path.isdir(directory):
            os.rename(directory, f"{directory}.damaged")
        self.manager.reload()

    def load_params(self, params):
        """Initial weights from elsewhere (stage 1 result, an imported checkpoint): a pure dict. With
        adapters these are the base's weights; the adapters keep their values."""
        if lora.enabled(self.config.model):  # a float base under a quantized or bfloat16 one
            params = traverse_util.unflatten_dict(lora.frozen_base(traverse_util.flatten_dict(params), self.config.model))
            trainable, _ = self.setup.split(self.params)
            params = trainable_split(self.config)[1](trainable, params)
        self.params = jax.device_put(params, self.param_shardings)
        release_host_memory()

    # -- the loop ----------------------------------------------------------------------------------
    def _global_batch(self, batch: dict):
        if jax.process_count() > 1 and batch.get("image_token_pooling") is not None:  # a Molmo2 batch
            from molmo_jax.preprocess.molmo2_example import global_pooling

            views = np.asarray(batch["pixel_values"]).shape
            shape = (views[0] * jax.process_count(),) + views[1:]
            where = sharding.batch_sharding(self.mesh, len(shape), shape[0]).addressable_devices_indices_map(shape)
            batch = global_pooling(batch, min(index[0].start or 0 for index in where.values()))
        out = {}
        for k in losses.BATCH_KEYS:
            if k in batch and batch[k] is not None:
                x = np.asarray(batch[k])
                shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
                sh = sharding.batch_sharding(self.mesh, x.ndim, shape[0])
                # The global shape is explicit: without it, a batch the mesh leaves replicated across
                # processes (batch not divisible by data*fsdp*expert, or tensor axes spanning hosts)
                # would silently become each process's own rows instead of one global batch.
                try:
                    out[k] = jax.make_array_from_process_local_data(sh, x, shape)
                except ValueError as e:
                    raise ValueError(
                        f"batch {k} {shape}: with {jax.process_count()} processes each must hold its own "
                        f"1/{jax.process_count()} of the batch, but mesh {dict(self.mesh.shape)} splits "
                        f"it as {sh.spec[0]}: make batch_size divisible by data*fsdp*expert and keep the "
                        f"tensor axis within a host ({e})") from e
        return out

    def model(self):
        """The current parameters as a Molmo module (for evaluation)."""
        state = jax.tree.map(lambda x: x, self.abstract)
        nnx.replace_by_pure_dict(state, self.params)
        return nnx.merge(self.graphdef, state)

    def fit(self, data_iter, progress: bool = True, evaluator=None):
        """Train until config.total_steps. `data_iter` yields per-process numpy batches and has
        get_state()/set_state() (its state is saved with every checkpoint). `evaluator(model) ->
        {name: number}` runs every `config.eval_every` steps; its results are logged as eval/*."""
        c = self.config
        if self.data_state is not None and hasattr(data_iter, "set_state"):
            data_iter.set_state(self.data_state)
        writer = MetricsWriter(self.workdir, enabled=self.is_main)
        bar = Progress(c.total_steps, self.step, enabled=progress and self.is_main)
        stop = {"sigterm": False}
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
        peak = (c.peak_flops_per_device or flops_lib.default_peak_flops_per_device()) * jax.device_count()
        t_last, tokens_since, steps_since = time.perf_counter(), 0, 0
        try:
            pending = None
            while self.step < c.total_steps and not stop["sigterm"]:
                batch = next(data_iter)
                n_tokens = int(np.sum(np.asarray(batch["input_ids"]) != -1)) * jax.process_count()
                gbatch = self._global_batch(batch)
                with sharding.use_mesh(self.mesh):
                    self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, gbatch,
                                                                      jnp.int32(self.step))
                self.step += 1
                # The previous step's flag: reading it after dispatching this step keeps the host
                # loading the next batch while the device computes (no per-step synchronisation).
                if pending is not None:
                    self._track_bad(bool(pending))
                pending = metrics["skipped"]
                self.data_state = data_iter.get_state() if hasattr(data_iter, "get_state") else None
                tokens_since += n_tokens
                steps_since += 1
                if self.step % c.log_every == 0 or self.step == c.total_steps:
                    m = jax.tree.map(lambda x: np.asarray(x).item(), jax.device_get(metrics))
                    dt = time.perf_counter() - t_last
                    m["tokens_per_s"] = tokens_since / dt
                    m["step_time_s"] = dt / steps_since
                    if peak:
                        rows, length = np.shape(batch["input_ids"])
                        # crops per row: Molmo's images are [B, C, ...], Molmo2's pixel_values [B * C, ...]
                        crops = (np.shape(batch["images"])[1] if "images" in batch else
                                 np.shape(batch["pixel_values"])[0] // rows if "pixel_values" in batch else 0)
                        f = flops_lib.train_step_flops(c.model, rows * jax.process_count(), length, crops)
                        m["mfu"] = f / (dt / steps_since) / peak
                    m["skipped_total"] = self.bad_total
                    writer.write(self.step, m)
                    bar.update(steps_since, m)
                    t_last, tokens_since, steps_since = time.perf_counter(), 0, 0
                if self.step % c.checkpoint_every == 0 and self.step < c.total_steps:
                    self.save()
                if evaluator is not None and c.get("eval_every") and self.step % c.eval_every == 0:
                    writer.write(self.step, evaluator(self.model()), prefix="eval")
            if pending is not None:
                self._track_bad(bool(pending))
            if steps_since:
                bar.update(steps_since)
            self.save(force=True)
            if stop["sigterm"]:
                log.warning("SIGTERM: saved a checkpoint at step %d and stopped", self.step)
        finally:
            self.manager.wait_until_finished()
            signal.signal(signal.SIGTERM, previous)
            bar.close()
            writer.close()
        return self.step

    def _track_bad(self, skipped: bool):
        if skipped:
            self.bad_total += 1
            self.bad_in_row += 1
            if self.bad_in_row >= self.config.max_bad_steps:
                raise TrainingStopped(
                    f"{self.bad_in_row} steps in a row had a non-finite loss or gradient (step {self.step}); "
                    f"stopping. The last good checkpoint is step {self.manager.latest_step()} in "
                    f"{self.workdir}/checkpoints.")
        else:
            self.bad_in_row = 0


def model_params_from_checkpoint(path: str):
    """Pure parameter dict from a molmo_jax model directory or a training checkpoint (stage 2 init)."""
    from molmo_jax import weights

    _, model = weights.load(path)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

