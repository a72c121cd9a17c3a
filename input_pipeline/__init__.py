"""Data for training and evaluation: datasets (TFDS builders), preprocessing in grain loaders."""


def make_train_iterator(config, process_index: int = 0, process_count: int = 1):
    """The training batch iterator named by `config.data.kind`, yielding this process's share of
    each global batch (numpy arrays in the model's layout) with get_state()/set_state()."""
    kind = config.data.kind
    if config.batch_size % process_count:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {process_count} processes")
    local = config.batch_size // process_count
    if kind == "random":
        from input_pipeline.random_data import RandomBatches
        return RandomBatches(config.model, batch_size=local, seq_len=config.seq_len,
                             seed=(config.data.seed, process_index))
    raise ValueError(f"data.kind={kind!r} is not available (known: random)")
