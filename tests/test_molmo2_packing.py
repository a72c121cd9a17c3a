"""Molmo2 rows packing several training records: each record of a packed row gets the logits it gets alone,
the packed batch's loss and gradients are the unpacked batch's, the loader packs deterministically per row
(the same rows for any number of processes), and the trainer's global batch points every process's pooling
indices at its own crops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from input_pipeline import MOLMO2_TINY_TOKENIZER
from molmo_jax import config as config_lib
from molmo_jax import losses
from molmo_jax.inference_molmo2 import processor_for
from molmo_jax.models import create_model
from molmo_jax.models.molmo2 import check_token_counts
from molmo_jax.preprocess import SequenceError
from molmo_jax.preprocess.molmo2_example import Molmo2Collator, Molmo2Examples, pack_row

SEQ = 1400
MEDIA = dict(max_images=2, max_frames=4)


@pytest.fixture(scope="module")
def setup():
    cfg = config_lib.get_config("molmo2_tiny")
    cfg.attention = "dense"
    proc = processor_for(cfg, MOLMO2_TINY_TOKENIZER)
    model = create_model(cfg, 0)
    # At the tiny init the adapter's features are ~1e-8 and barely move the logits; scaled up they move
    # them by ~0.2, so a record reading another record's crops could not pass (as in the media tests).
    nnx.update(model.connector, jax.tree.map(lambda v: v * 8.0, nnx.state(model.connector, nnx.Param)))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in ((100, 70), (60, 90))]
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(6)]
    records = [{"image": images[0], "message_list": [{"style": "vqa2", "question": "Which one is red?",
                                                      "answer": "the left one"}]},
               {"video": frames, "fps": 1.0, "message_list": [{"style": "vqa2", "question": "What happens?",
                                                               "answer": "it moves"}]},
               {"image": images, "message_list": [{"style": "pointing", "label": "dots", "question": "Point.",
                                                   "points": [[30.0, 45.0]], "image_index": 2}]}]
    make = Molmo2Examples(proc, SEQ, **MEDIA)
    return cfg, proc, model, [make(r, np.random.default_rng(k)) for k, r in enumerate(records)]


def run(model, batch):
    return np.asarray(model(**{k: jnp.asarray(batch[k]) for k in model.INPUTS if k in batch})["logits"])


def test_each_record_of_a_packed_row_gets_its_own_logits(setup):
    """float32, dense attention: the same products in another layout, so agreement to float32 rounding (1e-5).
    The same row without its subsegment_ids (records seeing each other, one image group) moves the later
    records' logits by far more, so the check can fail."""
    cfg, proc, model, examples = setup
    collate = Molmo2Collator(proc.image, SEQ, 2, video_settings=proc.video, pack_records=3, **MEDIA)
    packed, left_out = collate.pack(examples)
    assert left_out == 0 and packed["subsegment_ids"].max() == 2
    batch = collate([packed, examples[0]])   # a packed row beside a row of one record
    check_token_counts(cfg, batch)
    assert batch["subsegment_ids"][1, :len(examples[0]["input_ids"])].max() == 0
    logits = run(model, batch)
    single = Molmo2Collator(proc.image, SEQ, 1, video_settings=proc.video, **MEDIA)
    start = 0
    for ex in examples:
        n = len(ex["input_ids"])
        want = run(model, single([ex]))[0, :n]
        np.testing.assert_allclose(logits[0, start:start + n], want, atol=1e-5, rtol=1e-5)
        start += n
    np.testing.assert_allclose(logits[1, :len(examples[0]["input_ids"])], run(model, single([examples[0]]))[0,
                               :len(examples[0]["input_ids"])], atol=1e-5, rtol=1e-5)
    mixed = run(model, {k: v for k, v in batch.items() if k != "subsegment_ids"})
    n0 = len(examples[0]["input_ids"])
    assert np.abs(mixed[0, n0:start] - logits[0, n0:start]).max() > 1e-2


def test_packed_loss_and_gradients_are_the_unpacked_batchs(setup):
    """The same tokens and weights in one packed row or in three rows: the loss (a weighted mean) and every
    gradient agree to float32 rounding (1e-5 of each leaf's largest entry: sums over the same ~2000 terms in
    another order; leaves whose gradient is zero in exact arithmetic, the key biases a softmax cannot see, hold
    only ~1e-12 of rounding, hence the 1e-6 floor on the scale)."""
    cfg, proc, model, examples = setup
    packed = Molmo2Collator(proc.image, SEQ, 1, video_settings=proc.video, pack_records=3, **MEDIA)
    rows = Molmo2Collator(proc.image, SEQ, 3, video_settings=proc.video, **MEDIA)
    graphdef, state = nnx.split(model)
    results = []
    for batch in (packed([packed.pack(examples)[0]]), rows(examples)):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        loss_fn = lambda st: losses.training_loss(nnx.merge(graphdef, st), batch)  # noqa: E731
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
        results.append((float(loss), float(aux["weight"]), grads))
    (l1, w1, g1), (l2, w2, g2) = results
    assert w1 == w2 > 0 and l1 == pytest.approx(l2, rel=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        scale = max(float(jnp.abs(b).max()), 1e-6)
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=1e-5)


def test_pack_row_keeps_what_fits_and_counts_the_rest(setup):
    cfg, proc, model, examples = setup
    lengths = [len(ex["input_ids"]) for ex in examples]
    one_image = Molmo2Collator(proc.image, SEQ, 1, video_settings=proc.video, max_frames=4, pack_records=2)
    # room for two records' views: the two-image record does not fit after the image and the video
    packed, left_out = one_image.pack(examples)
    assert left_out == 1 and packed["subsegment_ids"].max() == 1
    assert len(packed["input_ids"]) == lengths[0] + lengths[1]
    # tokens: a row of the first record's length holds only it
    packed, left_out = pack_row(examples, lengths[0], one_image.layout)
    assert left_out == 2 and len(packed["input_ids"]) == lengths[0]
    np.testing.assert_array_equal(packed["position_ids"], np.arange(lengths[0]))
    with pytest.raises(SequenceError, match="fits a packed row of 10 tokens"):
        pack_row(examples, 10, one_image.layout)


def _config(tmp_path, **data):
    from configs import molmo2_tiny_sft

    config = molmo2_tiny_sft.get_config()
    config.update(batch_size=4, seq_len=640)
    config.data.update(synthetic_split_sizes="train=16,validation=4,test=4", data_dir=str(tmp_path / "data"), **data)
    return config


def test_loader_packs_each_row_the_same_for_any_number_of_processes(tmp_path):
    """Rows hold several records (positions restart at each), the left-out examples are counted, and the
    halves two processes load are the single process's rows, their pooling indices pointing at the
    global crops once the trainer offsets them (`global_pooling`)."""
    from input_pipeline import make_train_iterator
    from molmo_jax.preprocess.molmo2_example import global_pooling

    config = _config(tmp_path, pack_records=3)
    whole = make_train_iterator(config, 0, 1)
    batch = next(whole)
    seg, pos = batch["subsegment_ids"], batch["position_ids"]
    assert seg.max() >= 1
    for r in range(seg.shape[0]):   # every record of a row starts at position 0
        starts = np.flatnonzero(np.diff(seg[r], prepend=-2) != 0)
        starts = [s for s in starts if seg[r, s] >= 0]
        assert len(starts) == seg[r].max() + 1 and all(pos[r, s] == 0 for s in starts)
    check_token_counts(config.model, batch)
    halves = [next(make_train_iterator(config, p, 2)) for p in range(2)]
    first_view = halves[0]["pixel_values"].shape[0]
    halves[1] = global_pooling(halves[1], first_view)
    for key, value in batch.items():
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value, err_msg=key)
    assert set(whole.counts) <= {"packing: examples left out of a full row"}


def test_packing_settings_are_checked(tmp_path):
    from input_pipeline.loader import LoaderSettings, example_makers
    from molmo_jax.analysis.aot import abstract_batch
    from molmo_jax.recipe import validate

    with pytest.raises(ValueError, match="packing several records into a row is Molmo2's"):
        example_makers(config_lib.get_config("tiny"), LoaderSettings(global_batch=2, seq_len=64, seed=0,
                                                                     tokenizer="", pack_records=2))
    config = _config(tmp_path, pack_records=0)
    assert "data.pack_records: must be >= 1, got 0" in validate(config)
    from configs import tiny_sft
    molmo = tiny_sft.get_config()
    molmo.data.update(pack_records=2, max_frames=4)
    assert validate(molmo) == ["data.max_frames: 4 is for a Molmo2 (several images, videos, packed records); a Molmo "
                               "takes 0", "data.pack_records: 2 is for a Molmo2 (several images, videos, packed "
                               "records); a Molmo takes 1"]
    config.data.pack_records = 3
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "tensor", "expert"))
    spec = abstract_batch(config, mesh)
    proc = processor_for(config.model, MOLMO2_TINY_TOKENIZER, max_crops=config.data.max_crops)
    lay = Molmo2Collator(proc.image, config.seq_len, config.batch_size, pack_records=3).layout
    assert spec["subsegment_ids"].shape == (4, 640)
    assert spec["pixel_values"].shape[0] == 4 * lay.crops and spec["image_token_pooling"].shape[0] == 4 * lay.rows
