"""Convert Molmo and Molmo2 checkpoints between PyTorch and molmo_jax.

    python -m tools.convert import SRC DST [--config FILE|PRESET] [--dtype D] [--mesh data=1,fsdp=4,tensor=2]
    python -m tools.convert export SRC DST [--format hf|state_dict] [--dtype D] [--shard-size 5GB]
                                           [--tokenizer DIR] [--remote-code DIR]
    python -m tools.convert export RUN DST --adapters-only [--dtype D]
    python -m tools.convert init-from-base --vit CLIP_DIR --llm LLM_DIR DST [--vit-layers -2,-9] [--seed 0]

import: SRC is a released HF Molmo directory, an original-repo directory (config.json +
model.safetensors), a transformers Molmo2 directory (config.json model_type "molmo2", as
`save_pretrained` writes it or as released) or a state dict file (.safetensors, or .bin/.pt read
with weights_only=True).
export: SRC is a molmo_jax model directory, a training directory (latest step) or a step directory;
a Molmo2 becomes a directory that transformers' Molmo2ForConditionalGeneration.from_pretrained loads.
A LoRA run exports merged into its base; with --adapters-only its adapters alone become a PEFT adapter
directory (adapter_config.json + adapter_model.safetensors) for the released PyTorch model.
Every command validates first and writes DST atomically; an existing DST needs --overwrite.
"""
from __future__ import annotations

import argparse
import sys

DTYPES = ("float32", "bfloat16", "float16")


def _int_list(text):
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="PyTorch Molmo / Molmo2 -> molmo_jax model directory")
    p.add_argument("src", help="released HF or original-repo Molmo directory, transformers Molmo2 directory, "
                               "or a state dict file")
    p.add_argument("dst", help="the molmo_jax model directory to write")
    p.add_argument("--config", help="config.json (original, HF or molmo_jax) or preset name, for a bare state dict")
    p.add_argument("--dtype", choices=DTYPES, help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--mesh", help="align the stored arrays with this mesh's shardings, e.g. data=1,fsdp=8,tensor=1")
    p.add_argument("--tokenizer", help="tokenizer directory to copy (default: SRC's tokenizer files, if any)")

    p = sub.add_parser("export", help="molmo_jax checkpoint -> released HF layout (or one state dict file)")
    p.add_argument("src", help="molmo_jax model directory, training directory or training step directory")
    p.add_argument("dst", help="directory to write (--format hf) or .safetensors file (--format state_dict)")
    p.add_argument("--format", dest="fmt", choices=("hf", "state_dict"), default="hf")
    p.add_argument("--dtype", choices=DTYPES, help="output dtype (default: the checkpoint's)")
    p.add_argument("--shard-size", default="5GB", help="maximum tensor bytes per shard (default 5GB)")
    p.add_argument("--tokenizer", help="tokenizer directory to copy (default: SRC/tokenizer, if any)")
    p.add_argument("--remote-code", help="a released Molmo directory whose *.py / processor files to copy")
    p.add_argument("--adapters-only", action="store_true",
                   help="a LoRA run's adapters alone, as a PEFT adapter directory (peft.PeftModel.from_pretrained)")

    p = sub.add_parser("init-from-base", help="HF CLIP vision + HF Qwen2/OLMo-2/OLMoE -> Molmo for stage 1")
    p.add_argument("--vit", required=True, help="CLIPVisionModel (or CLIPModel) directory")
    p.add_argument("--llm", required=True, help="Qwen2 / OLMo-2 / OLMoE *ForCausalLM directory")
    p.add_argument("dst", help="the molmo_jax model directory to write")
    p.add_argument("--vit-layers", type=_int_list, default=(-2, -9), help="ViT layers whose features are used")
    p.add_argument("--vit-keep", type=int, help="ViT layers to keep (default: all but the last)")
    p.add_argument("--vocab-size", type=int, help="tokenizer size, if below the embedding rows (OLMoE: 50280)")
    p.add_argument("--additional-vocab-size", type=int, default=128)
    p.add_argument("--max-sequence-length", type=int, default=4096)
    p.add_argument("--dtype", choices=DTYPES, help="parameter dtype (default: the LLM checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh connector and embedding rows")
    p.add_argument("--tokenizer", help="tokenizer directory to copy (default: the LLM's tokenizer files)")
    for p in sub.choices.values():
        p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from tqdm import tqdm

    from molmo_jax import sharding, weights
    from molmo_jax.weights import WeightsError

    bar = tqdm(unit="B", unit_scale=True, desc=args.command, disable=args.no_progress, file=sys.stderr)

    def progress(n, total):
        if bar.total != total:
            bar.total = total
        bar.update(n)

    common = dict(overwrite=args.overwrite, progress=progress)
    try:
        if args.command == "import":
            mesh = sharding.parse_mesh(args.mesh) if args.mesh else None
            summary = weights.import_checkpoint(args.src, args.dst, config=args.config, dtype=args.dtype,
                                                mesh=mesh, tokenizer=args.tokenizer, **common)
        elif args.command == "export" and args.adapters_only:
            if args.fmt != "hf" or args.tokenizer or args.remote_code:
                raise WeightsError("--adapters-only writes a PEFT adapter directory; --format, --tokenizer and "
                                   "--remote-code do not apply to it")
            summary = weights.export_adapters(args.src, args.dst, dtype=args.dtype, **common)
        elif args.command == "export":
            summary = weights.export_checkpoint(args.src, args.dst, dtype=args.dtype, fmt=args.fmt,
                                                tokenizer=args.tokenizer, shard_size=args.shard_size,
                                                remote_code=args.remote_code, **common)
        else:
            summary = weights.init_from_base(
                args.vit, args.llm, args.dst, vit_layers=args.vit_layers, vit_keep=args.vit_keep,
                vocab_size=args.vocab_size, additional_vocab_size=args.additional_vocab_size,
                max_sequence_length=args.max_sequence_length, dtype=args.dtype, seed=args.seed,
                tokenizer=args.tokenizer, **common)
    except (WeightsError, sharding.MeshError) as e:
        bar.close()
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        bar.close()
        raise SystemExit(f"interrupted: {args.dst} was not written (or, with --overwrite, left as it was)")
    bar.close()
    print("\n".join(summary.lines()))


if __name__ == "__main__":
    main()
