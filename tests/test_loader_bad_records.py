"""A corpus of bad records through the loader: each is skipped and counted or repaired, none stops it."""
import contextlib
import io
import json
import pathlib
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

sys.path.insert(0, str(pathlib.Path(__file__).parent / "fixtures" / "pipeline"))
import hub_data  # noqa: E402

import input_pipeline  # noqa: E402
from input_pipeline import datasets, loader  # noqa: E402
from input_pipeline.builders import base  # noqa: E402
from molmo_jax import config as config_lib  # noqa: E402

SEQ_LEN = 256
GOOD = hub_data.image_bytes(48, 40, seed=1)


def _record(image: bytes, annotations: dict, width=48, height=40) -> dict:
    return {"image": image, "image_url": "", "image_sha256": "", "width": width, "height": height,
            "annotations": json.dumps(annotations)}


def _caption(text="A short caption."):
    return {"caption": text, "transcripts": []}


def _corpus():
    """(caption records, point records): every kind of bad input, a few good ones."""
    bad = hub_data.bad_images()
    caps = [_record(bad[name], _caption()) for name in ("corrupt", "truncated", "huge", "failure_note")]
    caps += [_record(bad["cmyk"], _caption("A CMYK picture.")), _record(bad["sixteen_bit"], _caption("Sixteen bits."))]
    caps += [_record(GOOD, _caption("")), _record(GOOD, {}), _record(GOOD, {"caption": None}),
             _record(GOOD, _caption("word " * 1500))]                       # far longer than SEQ_LEN
    points = [_record(GOOD, {"label": ["dot"], "points": [[[None, 4.0]]], "count": [1]}),       # NaN only: skipped
              _record(GOOD, {"label": ["dot", "cat"], "points": [[[150.0, -2.0]], []], "count": [1, 0]}),
              _record(GOOD, {"label": ["dot", "cat"], "points": [[[None, 4.0]], [[5.0, 5.0]]], "count": [1, 1]}),
              _record(GOOD, {"label": ["dot"], "points": [[[10.0, 20.0]]], "count": [1]})]
    return caps, points


class Corpus(base.RecordBuilder):
    """Writes given records in the PixMo record schema without any of the builders' checks."""
    VERSION = tfds.core.Version("1.0.0")
    RECORDS: list = []

    def _info(self):
        return self._make_info(tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_), "image_url": tfds.features.Text(),
            "image_sha256": tfds.features.Text(), "width": np.int32, "height": np.int32,
            "annotations": tfds.features.Text()}), description="bad records")

    def _split_generators(self, dl_manager):
        return {"train": ((i, r) for i, r in enumerate(self.RECORDS))}

    def _generate_examples(self):  # unused: records come from _split_generators
        raise NotImplementedError


def _write(folder: pathlib.Path, records) -> pathlib.Path:
    Corpus.RECORDS = records
    tfds.disable_progress_bar()
    builder = Corpus(data_dir=str(folder))
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(file_format="array_record", download_dir=str(folder / "scratch"))
    return pathlib.Path(builder.data_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    caps, points = _corpus()
    root = tmp_path_factory.mktemp("bad")
    return [(datasets.spec("pixmo_cap"), _write(root / "caps", caps), len(caps)),
            (datasets.spec("pixmo_points"), _write(root / "points", points), len(points))]


def _maker(corpus, global_batch=16, only=None):
    chosen = [c for c in corpus if only is None or c[0].name == only]
    settings = loader.LoaderSettings(global_batch=global_batch, seq_len=SEQ_LEN, seed=3,
                                     tokenizer=input_pipeline.TINY_TOKENIZER, stage="sft")
    return loader.BatchMaker([(spec, folder) for spec, folder, _ in chosen], [1.0] * len(chosen),
                             [n for _, _, n in chosen], config_lib.tiny(), settings)


def test_every_bad_record_is_skipped_and_counted_or_repaired(corpus):
    maker = _maker(corpus)
    counts, rows = {}, 0
    for b in range(6):
        batch, batch_counts = maker(b)
        assert batch["input_ids"].shape == (16, SEQ_LEN) and batch["images"].shape[:2] == (16, 5)
        rows += int(np.sum(np.any(batch["input_ids"] != -1, axis=1)))
        for reason, n in batch_counts.items():
            counts[reason] = counts.get(reason, 0) + n
    assert rows == 6 * 16  # every slot filled by a usable record
    assert set(counts) == {
        "pixmo_cap: skipped: bad image",                                  # corrupt, truncated, huge, error note
        "pixmo_cap: skipped: no usable caption or transcript",            # empty / missing / null caption
        "pixmo_points: skipped: no usable label",                         # the only conversation had NaN
        "pixmo_points: conversation dropped: NaN or missing coordinates",  # the other one is kept
        "pixmo_points: points clamped into the image"}, counts


def test_repairs_and_odd_images_give_real_rows(corpus):
    maker = _maker(corpus, only="pixmo_cap")
    rt = maker.runtime()
    notes = {}
    by_record = {}
    for index in range(len(rt.sources[0])):
        rng = np.random.default_rng(0)
        try:
            example = datasets.spec("pixmo_cap").convert(rt.sources[0][index], rng, notes)
            by_record[example["message_list"][0]["text"][:12]] = rt.preprocessor(example, rng)
        except Exception as error:  # noqa: BLE001 - the loader's behaviour is tested above
            by_record.setdefault("errors", []).append(loader.skip_reason(error))
    assert "A CMYK pictu" in by_record and "Sixteen bits" in by_record   # converted, not skipped
    assert by_record["errors"].count("bad image") == 4


def test_overlong_sequences_are_truncated_with_a_consistent_loss_mask(corpus):
    maker = _maker(corpus, global_batch=10, only="pixmo_cap")
    batch, _ = maker(0)
    lengths = (batch["input_ids"] != -1).sum(1)
    long_rows = np.flatnonzero(lengths == SEQ_LEN)
    assert len(long_rows) >= 1  # the 1500-word caption, cut at the sequence length
    for row in long_rows:
        assert np.all(batch["target_tokens"][row] != -1) and np.all(batch["loss_masks"][row] >= 0)
        assert batch["loss_masks"][row, -1] > 0  # cut inside the caption: its tokens keep their loss
    real = batch["input_ids"] != -1
    np.testing.assert_array_equal(batch["loss_masks"] != -1, real)
    np.testing.assert_array_equal(batch["target_tokens"] != -1, real)
    assert np.all(batch["loss_masks"][batch["input_ids"] >= config_lib.tiny().llm.vocab_size] == 0)


def test_a_dataset_of_only_bad_records_gives_padding_not_a_stall(tmp_path):
    bad = hub_data.bad_images()
    folder = _write(tmp_path / "all_bad", [_record(bad["corrupt"], _caption()), _record(GOOD, _caption(""))])
    maker = loader.BatchMaker([(datasets.spec("pixmo_cap"), folder)], [1.0], [2], config_lib.tiny(),
                              loader.LoaderSettings(global_batch=2, seq_len=SEQ_LEN, seed=0, max_fallbacks=3,
                                                    tokenizer=input_pipeline.TINY_TOKENIZER))
    batch, counts = maker(0)
    assert all(np.all(v == -1) for v in batch.values()) and batch["input_ids"].shape == (2, SEQ_LEN)
    assert counts["pixmo_cap: slot left as padding after 4 bad records"] == 2


def test_a_worker_process_survives_the_corpus(corpus):
    """The same batches from a grain worker process as in-process: nothing crashed or stalled it."""
    expected = [_maker(corpus)(b)[0] for b in range(2)]
    it = loader.TrainLoader(_maker(corpus), num_workers=1)
    try:
        for want in expected:
            got = next(it)
            for key in want:
                np.testing.assert_array_equal(want[key], got[key], err_msg=key)
        assert it.get_state()["counts"]
    finally:
        it.close()
