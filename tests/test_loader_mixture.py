"""Mixtures: grouped root-size rates, the sampling plan, missing datasets, a mixture of built PixMo sets."""
import contextlib
import io
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "fixtures" / "pipeline"))
import hub_data  # noqa: E402

import input_pipeline  # noqa: E402
from configs import tiny_sft  # noqa: E402
from input_pipeline import datasets, mixtures  # noqa: E402
from tools import build_data  # noqa: E402


def test_root_size_rates_inside_a_group_follow_the_spec_example():
    group = mixtures.Group(0.35, tuple((f"d{i}", None) for i in range(6)))
    sizes = dict(zip((f"d{i}" for i in range(6)), (160_000, 160_000, 40_000, 40_000, 36_100, 36_100)))
    rates = mixtures.mixture_rates([group], sizes)  # one group: renormalised to 1
    got = np.array([rates[f"d{i}"] for i in range(6)]) * 0.35
    np.testing.assert_allclose(got, [0.0886, 0.0886, 0.0443, 0.0443, 0.0421, 0.0421], atol=1e-4)


def test_sft_mixture_groups_and_caps():
    groups = mixtures.MIXTURES["3.2-synthetic"]
    names = mixtures.dataset_names(groups)
    assert len(names) == 4 + 21 + 6 and all(n in datasets.DATASETS for n in names)
    sizes = {n: 1_000_000 for n in names}  # pixmo_cap's rate must use its 50k cap, not this
    sizes["pixmo_ask_model_anything"] = 50_000
    rates = mixtures.mixture_rates(groups, sizes)
    assert abs(sum(rates.values()) - 1) < 1e-12
    for group in groups:
        assert abs(sum(rates[n] for n, _ in group.datasets) - group.rate) < 1e-12
    assert rates["pixmo_cap"] == pytest.approx(rates["pixmo_ask_model_anything"])
    assert rates["dv_qa"] == pytest.approx(rates["text_vqa"] * np.sqrt(10_000 / 1_000_000))


def test_parse_mixture_forms_and_errors():
    assert mixtures.parse_mixture("pixmo_points") == (mixtures.Group(1.0, (("pixmo_points", None),)),)
    rates = mixtures.mixture_rates(mixtures.parse_mixture("a:3, b:1"), {"a": 10, "b": 1000})
    assert rates == {"a": 0.75, "b": 0.25}
    for bad in ("a:x", "a:0", ":1", ""):
        with pytest.raises(ValueError, match="mixture|empty"):
            mixtures.parse_mixture(bad)


def _original_order(seed, rates, lengths, batch, n_batches):
    """The original's IterableDatasetMixture order, written out plainly."""
    rs, counters, out = np.random.RandomState(seed), [0] * len(rates), []
    for _ in range(n_batches):
        slots = []
        for d in rs.choice(len(rates), size=batch, p=rates):
            epoch, pos = divmod(counters[d], lengths[d])
            slots.append((int(d), int(np.random.RandomState(seed + 1771 * epoch).permutation(lengths[d])[pos]), epoch))
            counters[d] += 1
        out.append(slots)
    return out


def test_plan_reproduces_the_original_order_with_random_access():
    rates, lengths = [0.5, 0.3, 0.2], [7, 3, 11]
    mixtures.MixturePlan.SNAPSHOT_EVERY = 4  # exercise the snapshots on a short run
    try:
        plan = mixtures.MixturePlan(["a", "b", "c"], rates, lengths, seed=5, global_batch=6)
        expected = _original_order(5, rates, lengths, 6, 12)
        for b in [0, 1, 2, 9, 3, 11, 10, 5, 5]:  # sequential, jumps ahead and back, repeats
            choices, items = plan.dataset_choices(b)
            got = []
            for d, item in zip(choices, items):
                record, epoch = plan.record(int(d), int(item))
                got.append((int(d), record, epoch))
            assert got == expected[b], b
    finally:
        mixtures.MixturePlan.SNAPSHOT_EVERY = 1000
    # Every epoch of a dataset visits each record once.
    seen = [plan.record(1, item)[0] for item in range(6)]
    assert sorted(seen[:3]) == [0, 1, 2] and sorted(seen[3:]) == [0, 1, 2]


def test_missing_datasets_are_named_with_build_commands(tmp_path):
    cfg = tiny_sft.get_config()
    cfg.data.update(kind="mixture", mixture="3.2-synthetic", data_dir=str(tmp_path))
    with pytest.raises(datasets.MissingDatasetError) as error:
        input_pipeline.make_train_iterator(cfg)
    message = str(error.value)
    assert "31 dataset(s) of the mixture are not built" in message
    assert f"pixmo_points_high_freq: python -m tools.build_data pixmo_points --data-dir {tmp_path} --subset " \
           "high_frequency --source HUB_DIR --images IMAGE_DIR" in message
    assert "text_vqa: python -m tools.build_data vqa --data-dir" in message and "--name text_vqa --style text_vqa" in message
    cfg.data.drop_missing = True
    with pytest.raises(datasets.MissingDatasetError):  # nothing at all is built: still an error
        input_pipeline.make_train_iterator(cfg)
    with pytest.raises(KeyError, match="unknown dataset 'pixmo_pets'"):
        datasets.spec("pixmo_pets")


@pytest.fixture(scope="module")
def pixmo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixmo_mix")
    info = hub_data.make_hub(root)
    common = ["--data-dir", str(root / "data"), "--source", str(info["hub"]), "--images", str(info["images"])]
    for argv in (["pixmo_points", "--subset", "basic"], ["pixmo_count"], ["pixmo_cap"]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert build_data.main(argv + common) == 0
    return str(root / "data")


def test_mixture_of_built_pixmo_datasets(pixmo_dir):
    cfg = tiny_sft.get_config()
    cfg.batch_size = 8
    cfg.data.update(kind="mixture", mixture="pixmo_only", data_dir=pixmo_dir, drop_missing=True)
    loader = input_pipeline.make_train_iterator(cfg)
    assert sorted(loader.fingerprint["datasets"]) == ["pixmo_cap", "pixmo_count", "pixmo_count_counting",
                                                      "pixmo_points", "pixmo_points_counting"]
    batches = [next(loader) for _ in range(4)]
    assert all(b["input_ids"].shape == (8, 512) and b["images"].shape[:2] == (8, 5) for b in batches)
    assert all(np.all((b["input_ids"] != -1).sum(1) > 0) for b in batches)  # no slot left empty
    # pixmo_count's first train image has pixel points outside it, pixmo_points' p1 a point at x=104%.
    counts = loader.get_state()["counts"]
    assert counts and all(reason.endswith("points clamped into the image") for reason in counts), counts
    rates = mixtures.mixture_rates(mixtures.drop_datasets(mixtures.MIXTURES["pixmo_only"], {
        "pixmo_ask_model_anything", "pixmo_cap_qa", "pixmo_pointing_explanations", "pixmo_docs_charts",
        "pixmo_docs_tables", "pixmo_docs_other", "pixmo_docs_diagrams", "pixmo_points_high_freq",
        "pixmo_points_high_freq_counting"}), loader.fingerprint["datasets"])
    assert rates["pixmo_cap"] == pytest.approx(0.15 / 0.5)  # alone in its group: the group's rate, renormalised


def test_stage1_caption_mode_on_pixmo_cap(pixmo_dir):
    from configs import tiny_pretrain
    from molmo_jax.preprocess import MolmoTokenizer

    cfg = tiny_pretrain.get_config()
    # What configs/base.py's pretrain() sets for the released models, on the tiny model.
    cfg.data.update(kind="mixture", mixture="pixmo_cap_with_transcripts", data_dir=pixmo_dir)
    batch = next(input_pipeline.make_train_iterator(cfg))
    tok = MolmoTokenizer(input_pipeline.TINY_TOKENIZER, cfg.model.llm.vocab_size)
    for row in batch["input_ids"]:
        text = tok.decode([t for t in row if 0 <= t < tok.vocab_size], truncate_at_eos=False)
        assert "A caption number" in text and "long_caption" in text
        # Every fixture image with a caption has at least one transcript: both are packed.
        assert "transcript" in text and ("um so this is picture" in text or "another take on" in text)
