"""Run the forward pass of a model directory on reference-style inputs.

    python -m tools.forward MODEL_DIR --inputs INPUTS.npz --out OUT.npz [--dtype bfloat16] [--grads]

Molmo: INPUTS.npz uses the golden layout: `input_ids`, `images`, `image_masks`, `image_input_idx`, and
optionally the `batch2_*` (a padded batch) and `loss_*` (training example: `loss_input_ids`,
`loss_labels`, `loss_masks`) variants. OUT.npz gets `logits`, `connector_output`, and
`batch2_logits` / `loss` / `z_loss` when their inputs are present. With `--grads`, OUT.npz also gets
`grad/<name>` for every parameter: the gradient of the training loss of the `loss_*` example (the
trainer's own loss path, without the z-loss), in the original's parameter names (no `model.` prefix)
and PyTorch layout, as the golden `grads.npz`.

Molmo2: INPUTS.npz holds transformers' Molmo2 input names (`MOLMO2_INPUTS`: input_ids, pixel_values,
image_token_pooling, ..., attention_mask, mm_token_type_ids); OUT.npz gets `logits`, computed as
transformers' forward computes them (keys with attention_mask 0 masked, positions 0..T-1 unless
`position_ids` is given). MODEL_DIR may be any checkpoint `weights.load` reads.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

REQUIRED = ("input_ids", "images", "image_masks", "image_input_idx")
MOLMO2_INPUTS = ("input_ids", "pixel_values", "image_token_pooling", "image_grids", "image_num_crops",
                 "pixel_values_videos", "video_token_pooling", "video_grids", "attention_mask", "mm_token_type_ids",
                 "position_ids")


def load_npz(path) -> dict:
    try:
        with np.load(path) as f:
            return dict(f)
    except FileNotFoundError:
        raise SystemExit(f"error: {path}: no such file")
    except Exception as e:  # zip/pickle errors of a file that is not an npz
        raise SystemExit(f"error: {path}: not a readable .npz file ({e})")


def read_inputs(path, data=None) -> dict:
    """A Molmo golden-layout inputs file, checked."""
    data = load_npz(path) if data is None else data
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise SystemExit(f"error: {path}: missing arrays {', '.join(missing)} (has {', '.join(sorted(data))})")
    for prefix in ("", "batch2_"):
        ids, images = data.get(prefix + "input_ids"), data.get(prefix + "images")
        if ids is None or images is None:
            continue
        if ids.ndim != 2 or images.ndim != 4 or images.shape[0] != ids.shape[0]:
            raise SystemExit(f"error: {path}: {prefix}input_ids {ids.shape} and {prefix}images {images.shape} "
                             "must be [B, T] and [B, C, P, 588] with the same B")
    return data


def loss_gradients(cfg, model, data) -> dict:
    """{"grad/<original name>": array} of the loss (no z-loss) of the `loss_*` example, computed with
    `losses.training_loss`, the trainer's objective, and mapped to the original's names and layout."""
    import jax
    from flax import nnx

    from molmo_jax import losses
    from molmo_jax.weights.mappings import molmo as molmo_mapping
    from molmo_jax.weights.params import flatten_params
    from molmo_jax.weights.rules import to_torch

    masks = data["loss_masks"]
    batch = dict(input_ids=data["loss_input_ids"], target_tokens=np.where(masks > 0, data["loss_labels"], -1),
                 loss_masks=masks, images=data["images"], image_masks=data["image_masks"],
                 image_input_idx=data["image_input_idx"])
    graphdef, state = nnx.split(model)

    def loss(state):
        return losses.training_loss(nnx.merge(graphdef, state), batch)[1]["loss"]

    grads = {p: np.asarray(g, np.float32) for p, g in flatten_params(jax.jit(jax.grad(loss))(state)).items()}
    return {f"grad/{k}": v for k, v in to_torch(molmo_mapping.rules(cfg), grads).items()}


def molmo2_logits(cfg, model, data, path) -> np.ndarray:
    """Logits of a Molmo2 on transformers' input arrays, as transformers' forward computes them."""
    import jax
    from flax import nnx

    from molmo_jax.models.molmo2 import check_token_counts

    unknown = sorted(set(data) - set(MOLMO2_INPUTS))
    if unknown or "input_ids" not in data:
        raise SystemExit(f"error: {path}: a Molmo2 takes input_ids and {', '.join(MOLMO2_INPUTS[1:])}; "
                         f"got {', '.join(sorted(data))}")
    ids = np.asarray(data["input_ids"])
    if ids.ndim != 2:
        raise SystemExit(f"error: {path}: input_ids must be [B, T], got {ids.shape}")
    if "attention_mask" in data:
        ids = np.where(np.asarray(data["attention_mask"]) > 0, ids, -1)
    positions = data.get("position_ids", np.broadcast_to(np.arange(ids.shape[1]), ids.shape))
    inputs = {k: data[k] for k in type(model).PROMPT_INPUTS if k in data and k != "input_ids"}
    try:
        check_token_counts(cfg, dict(inputs, input_ids=ids))
    except ValueError as e:
        raise SystemExit(f"error: {path}: {e}")
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, positions, inputs):
        return nnx.merge(graphdef, state)(ids, position_ids=positions, **inputs)["logits"]

    return np.asarray(run(state, ids, np.asarray(positions, np.int32), inputs), np.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.forward", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", help="a checkpoint (Molmo: original or released HF form; Molmo2: transformers')")
    parser.add_argument("--inputs", required=True,
                        help="inputs .npz (Molmo: golden layout; Molmo2: transformers' names)")
    parser.add_argument("--out", required=True, help="where to write the outputs .npz")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--grads", action="store_true",
                        help="also write grad/<name> for every parameter (needs the loss_* arrays)")
    args = parser.parse_args(argv)

    import jax
    from flax import nnx

    from molmo_jax import losses
    from molmo_jax import weights
    from molmo_jax.weights import WeightsError

    from molmo_jax.models import family_of

    data = load_npz(args.inputs)
    t0 = time.time()
    try:
        cfg, model = weights.load(args.model_dir, dtype=args.dtype, compute_dtype=args.dtype)
    except WeightsError as e:
        raise SystemExit(f"error: {e}")
    if family_of(cfg) == "molmo2":
        if args.grads:
            raise SystemExit("error: --grads is for Molmo checkpoints (the golden gradients)")
        logits = molmo2_logits(cfg, model, data, args.inputs)
        np.savez(args.out, logits=logits)
        print(f"{cfg.name}: logits {logits.shape}; wrote {args.out} in {time.time() - t0:.1f}s")
        return 0
    data = read_inputs(args.inputs, data)
    if args.grads and "loss_input_ids" not in data:
        raise SystemExit(f"error: {args.inputs}: --grads needs the training example (loss_input_ids, loss_labels, "
                         "loss_masks)")
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, images, masks, idx):
        m = nnx.merge(graphdef, state)
        return m(ids, images, masks, idx)["logits"]

    @jax.jit
    def connector(state, images, masks):
        return nnx.merge(graphdef, state).image_features(images, masks)

    out = {}
    img = (data["images"], data["image_masks"], data["image_input_idx"])
    out["logits"] = np.asarray(run(state, data["input_ids"], *img), np.float32)
    out["connector_output"] = np.asarray(connector(state, data["images"], data["image_masks"]), np.float32)
    if "batch2_input_ids" in data:
        out["batch2_logits"] = np.asarray(run(state, data["batch2_input_ids"], data["batch2_images"],
                                              data["batch2_image_masks"], data["batch2_image_input_idx"]),
                                          np.float32)
    if "loss_input_ids" in data:
        logits = run(state, data["loss_input_ids"], *img)
        masks = data["loss_masks"]
        labels = np.where(masks > 0, data["loss_labels"], -100)
        loss, z_loss, _ = losses.loss_fn({"logits": logits}, labels, masks)
        out["loss"], out["z_loss"] = np.float32(loss), np.float32(z_loss)
    if args.grads:
        out.update(loss_gradients(cfg, model, data))
    np.savez(args.out, **out)
    summary = f"{cfg.name}: logits {out['logits'].shape}"
    if "batch2_logits" in out:
        summary += f", batch2_logits {out['batch2_logits'].shape}"
    if "loss" in out:
        summary += f", loss {float(out['loss']):.6f} (z-loss {float(out['z_loss']):.6f})"
    if args.grads:
        summary += f", {sum(k.startswith('grad/') for k in out)} gradients"
    print(f"{summary}; wrote {args.out} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
