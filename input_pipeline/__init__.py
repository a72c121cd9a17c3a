"""Data for training and evaluation: datasets (TFDS builders), preprocessing in grain loaders.

`make_train_iterator(config, process_index, process_count)` is what the trainer calls. `config.data`:
    kind          "random" (no files), "synthetic" (the built-in synthetic PixMo, built on first use) or
                  "mixture" (datasets built with `python -m tools.build_data`)
    data_dir      TFDS data directory (default: $MOLMO_JAX_DATA_DIR or ~/.cache/molmo_jax/data)
    mixture       kind "mixture": a name in `mixtures.MIXTURES` ("pixmo_cap_with_transcripts",
                  "3.2-synthetic", ...), one dataset name, or "name:rate,name:rate"
    seed          data seed (mixture draws, epoch permutations, per-example choices)
    max_crops     crops per image (default: the model's)
    num_workers   preprocessing worker processes (0: one background thread)
optional:
    tokenizer     folder with the LLM's tokenizer.json (default for the tiny/demo models: the bundled
                  molmo_jax/assets/tiny_tokenizer; required otherwise)
    seq_buckets   padded sequence lengths, e.g. (1024, 2304) (default: (seq_len,), one fixed shape)
    worker_buffer batches buffered per worker (default 2)
    drop_missing  leave unbuilt datasets out of the mixture (renormalising) instead of failing
    max_images, max_frames  Molmo2: images of a record (default 1), frames of a video record (default 0)
    pack_records  Molmo2: records drawn per row, packed into it while they fit (default 1: one per row)
    synthetic_split_sizes  kind "synthetic": e.g. "train=400,validation=50,test=50" (default sizes otherwise)
    synthetic_options      kind "synthetic": renderer options, e.g. "grid=4,max_objects=4" (see
                  input_pipeline.synthetic.parse_options)
Stage "pretrain" formats with stage-1 settings (length hints, no roles, no loss rescaling); "sft" with
the released settings. Kind "synthetic" reads the caption + transcript of each image in stage 1 and
every task conversation (pointing, counting, QA, clocks, charts) in stage 2.
"""
from __future__ import annotations

import os

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "molmo_jax", "assets")
TINY_TOKENIZER = os.path.join(_ASSETS, "tiny_tokenizer")
DEMO_TOKENIZER = os.path.join(_ASSETS, "demo_tokenizer")    # whole words (tools/build_demo_tokenizer.py)
MOLMO2_TINY_TOKENIZER = os.path.join(_ASSETS, "molmo2_tiny_tokenizer")
BUNDLED_TOKENIZERS = {"tiny": TINY_TOKENIZER, "bench_s": TINY_TOKENIZER, "demo": DEMO_TOKENIZER,
                      "molmo2_tiny": MOLMO2_TINY_TOKENIZER}


def bundled_tokenizer(model_name) -> str | None:
    """The tokenizer folder shipped for a model preset (tiny, bench_s, demo), else None."""
    return BUNDLED_TOKENIZERS.get(model_name)


def _data_option(config, key, default=None):
    value = config.data.get(key, default)
    return default if value is None or value == "" else value


def tokenizer_dir(config) -> str:
    path = _data_option(config, "tokenizer")
    if path:
        return str(path)
    bundled = bundled_tokenizer(config.model.get("name"))
    if bundled:
        return bundled
    raise ValueError(f"config.data.tokenizer is not set: give the folder holding the tokenizer.json of "
                     f"{config.model.get('name')!r}'s LLM")


def synthetic_options(config):
    """config.data.synthetic_options ("grid=4,max_objects=4", ...) as SyntheticOptions (None = default)."""
    text = _data_option(config, "synthetic_options")
    if not text:
        return None
    from input_pipeline.synthetic import parse_options
    return parse_options(str(text))


def synthetic_split_sizes(config) -> dict[str, int] | None:
    """config.data.synthetic_split_sizes ("train=4000,test=200") as {split: size} (None = builder default)."""
    text = _data_option(config, "synthetic_split_sizes")
    if not text:
        return None
    from input_pipeline.builders.base import parse_split_sizes
    return parse_split_sizes(str(text), ("train", "validation", "test"))


def _sources(config):
    """[(DatasetSpec, folder)], sizes, groups for the configured data kind."""
    from input_pipeline import datasets, mixtures

    data_dir = str(_data_option(config, "data_dir", datasets.default_data_dir()))
    if config.data.kind == "synthetic":
        folder = datasets.ensure_synthetic(data_dir, synthetic_split_sizes(config), synthetic_options(config))
        mixture = "synthetic_pretrain" if config.stage == "pretrain" else "synthetic_sft"
        groups = mixtures.MIXTURES[mixture]
        folders = {name: folder for name in mixtures.dataset_names(groups)}
    else:
        mixture = str(_data_option(config, "mixture", ""))
        groups = mixtures.parse_mixture(mixture)
        names = mixtures.dataset_names(groups)
        if _data_option(config, "drop_missing", False):
            present = [n for n in names if datasets.dataset_dir(data_dir, datasets.spec(n)) is not None]
            groups = mixtures.drop_datasets(groups, set(names) - set(present))
            names = present
            if not names:
                datasets.check_built(data_dir, mixtures.dataset_names(mixtures.parse_mixture(mixture)))
        folders = datasets.check_built(data_dir, names)
    return mixture, groups, folders


def make_loader(config, process_index: int = 0, process_count: int = 1, split: str = "train"):
    """The grain `TrainLoader` for kinds "synthetic" and "mixture" (see the module docstring)."""
    import tensorflow_datasets as tfds

    from input_pipeline import datasets, loader, mixtures

    mixture, groups, folders = _sources(config)
    names = sorted(folders)
    lengths = {}
    for name in names:
        splits = tfds.builder_from_directory(str(folders[name])).info.splits
        if split not in splits:
            raise ValueError(f"dataset {name} at {folders[name]} has no {split!r} split (it has {sorted(splits)})")
        lengths[name] = int(splits[split].num_examples)
    rates = mixtures.mixture_rates(groups, lengths)
    tokenizer = tokenizer_dir(config)
    if not (os.path.isfile(tokenizer) or os.path.isfile(os.path.join(tokenizer, "tokenizer.json"))):
        raise FileNotFoundError(f"config.data.tokenizer: no tokenizer.json in {tokenizer!r}")
    buckets = _data_option(config, "seq_buckets")
    settings = loader.LoaderSettings(
        global_batch=int(config.batch_size), seq_len=int(config.seq_len), seed=int(config.data.seed),
        tokenizer=tokenizer, stage=str(config.stage), split=split, process_index=process_index,
        process_count=process_count, max_crops=_data_option(config, "max_crops"),
        max_images=int(_data_option(config, "max_images", 1)), max_frames=int(_data_option(config, "max_frames", 0)),
        pack_records=int(_data_option(config, "pack_records", 1)),
        seq_buckets=tuple(int(b) for b in buckets) if buckets else None)
    sources = [(datasets.spec(name), folders[name]) for name in names]
    maker = loader.BatchMaker(sources, [rates[n] for n in names], [lengths[n] for n in names], config.model, settings)
    fingerprint = {"mixture": mixture, "seed": settings.seed, "global_batch": settings.global_batch,
                   "seq_len": settings.seq_len, "datasets": {n: lengths[n] for n in names}}
    if settings.pack_records != 1:
        fingerprint["pack_records"] = settings.pack_records
    return loader.TrainLoader(maker, num_workers=int(_data_option(config, "num_workers", 0)),
                              worker_buffer=int(_data_option(config, "worker_buffer", 2)), fingerprint=fingerprint)


def make_train_iterator(config, process_index: int = 0, process_count: int = 1):
    """The training batch iterator named by `config.data.kind`, yielding this process's share of each
    global batch (numpy arrays in the model's layout) with get_state()/set_state()."""
    kind = config.data.kind
    if config.batch_size % process_count:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {process_count} processes")
    local = config.batch_size // process_count
    if kind == "random":
        from input_pipeline.random_data import RandomBatches
        return RandomBatches(config.model, batch_size=local, seq_len=config.seq_len,
                             seed=(config.data.seed, process_index))
    if kind in ("synthetic", "mixture"):
        return make_loader(config, process_index, process_count)
    raise ValueError(f"data.kind={kind!r} is not available (known: random, synthetic, mixture)")
