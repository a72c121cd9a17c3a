"""Molmo2 training records with several images or a video: their prompts are the processor's (itself
equal to transformers'), and a batch mixing image, several-image and video rows gives every row the
logits the model gives that prompt alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from input_pipeline import MOLMO2_TINY_TOKENIZER
from molmo_jax import config as config_lib
from molmo_jax.inference_molmo2 import model_batch, processor_for
from molmo_jax.models import create_model
from molmo_jax.models.molmo2 import check_token_counts
from molmo_jax.preprocess import FormatError, SequenceError
from molmo_jax.preprocess.molmo2_example import Molmo2Collator, Molmo2Examples

SEQ = 1400


@pytest.fixture(scope="module")
def setup():
    cfg = config_lib.get_config("molmo2_tiny")
    cfg.attention = "dense"
    return cfg, processor_for(cfg, MOLMO2_TINY_TOKENIZER)


def media(seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in ((100, 70), (60, 90))]
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(6)]
    return images, frames


def question(text="Which one is red?", answer="the left one"):
    return {"style": "vqa2", "question": text, "answer": answer}


def processor_prompt(proc, content, **options):
    """The processor's inputs for one user turn with these media parts and the training prompt text."""
    messages = [{"role": "user", "content": content}]
    return proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **options)


def check_prompt(ex, expected, pixels_key, pooling_key):
    n = expected["input_ids"].shape[1]
    np.testing.assert_array_equal(ex["input_ids"][:n], expected["input_ids"][0])
    np.testing.assert_array_equal(ex["mm_token_type_ids"][:n], expected["mm_token_type_ids"][0])
    assert not ex["loss_masks"][:n - 1].any() and ex["loss_masks"][n - 1:].any()
    np.testing.assert_array_equal(ex[pixels_key], expected[pixels_key])
    np.testing.assert_array_equal(ex[pooling_key], expected[pooling_key])
    return n


def test_several_images_record_is_the_inference_prompt(setup):
    cfg, proc = setup
    images, _ = media()
    ex = Molmo2Examples(proc, SEQ, max_images=2)({"image": images, "message_list": [question()]})
    parts = [{"type": "image", "image": im} for im in images]
    expected = processor_prompt(proc, parts + [{"type": "text", "text": "vqa2: Which one is red?"}])
    check_prompt(ex, expected, "pixel_values", "image_token_pooling")
    assert ex["metadata"]["image_sizes"] == [(100, 70), (60, 90)]
    # a pointing conversation points on its image_index, in that image's thousandths
    point = {"style": "pointing", "label": "dots", "question": "Point to the dots.", "points": [[30.0, 45.0]],
             "image_index": 2}
    ex = Molmo2Examples(proc, SEQ, max_images=2)({"image": images, "message_list": [point]})
    trained = proc.tokenizer.decode(ex["target_tokens"][ex["loss_masks"] > 0], skip_special_tokens=False)
    assert trained.startswith('<points coords="2 1 500 500" alt="dots">dots</points>'), trained


def test_video_record_is_the_inference_prompt(setup, tmp_path):
    from PIL import Image

    cfg, proc = setup
    _, frames = media()
    make = Molmo2Examples(proc, SEQ, max_frames=4)
    ex = make({"video": frames, "fps": 1.0, "message_list": [question("What happens?", "it moves")]})
    expected = processor_prompt(proc, [{"type": "video", "video": frames},
                                       {"type": "text", "text": "vqa2: What happens?"}],
                                video_metadata=[dict(total_num_frames=6, fps=1.0)], num_frames=4)
    check_prompt(ex, expected, "pixel_values_videos", "video_token_pooling")
    for k, frame in enumerate(frames):  # a folder of frame files reads as the frames in name order
        Image.fromarray(frame).save(tmp_path / f"{k:03d}.png")
    from_folder = make({"video": str(tmp_path), "fps": 1.0, "message_list": [question("What happens?", "it moves")]})
    np.testing.assert_array_equal(from_folder["input_ids"], ex["input_ids"])
    np.testing.assert_array_equal(from_folder["pixel_values_videos"], ex["pixel_values_videos"])
    assert 1 <= len(ex["pixel_values_videos"]) <= 4 and len(ex["metadata"]["frame_times"]) == len(ex["pixel_values_videos"])


def test_batch_of_image_several_image_and_video_rows_gives_each_prompt_its_own_logits(setup):
    """Frames ride in pixel_values with their 3x3 pooling rows beside the images' 2x2 ones (padded with -1
    slots); every row's prompt positions get the logits of that prompt alone (float32, dense attention:
    the same products in another batch, so agreement to float32 rounding, 1e-5)."""
    cfg, proc = setup
    images, frames = media()
    records = [{"image": images[0], "message_list": [question()]},
               {"image": images, "message_list": [question()]},
               {"video": frames, "fps": 1.0, "message_list": [question("What happens?", "it moves")]}]
    make = Molmo2Examples(proc, SEQ, max_images=2, max_frames=4)
    examples = [make(r) for r in records]
    collate = Molmo2Collator(proc.image, SEQ, 3, video_settings=proc.video, max_images=2, max_frames=4)
    batch = collate(examples)
    check_token_counts(cfg, batch)
    assert batch["image_token_pooling"].shape[1] == 9 and batch["pixel_values"].shape[0] == 3 * collate.crops
    model = create_model(cfg, 0)
    # At the tiny init the adapter's features are ~1e-8 (three products of small weights) and move the
    # logits by ~1e-7: scaled up, they are about the size of the token embeddings and move them by ~0.2,
    # so a row reading another row's crops could not pass.
    nnx.update(model.connector, jax.tree.map(lambda v: v * 8.0, nnx.state(model.connector, nnx.Param)))
    names = model.INPUTS
    logits = np.asarray(model(**{k: jnp.asarray(batch[k]) for k in names if k in batch})["logits"])
    alone = [processor_prompt(proc, [{"type": "image", "image": images[0]}, {"type": "text", "text": "vqa2: Which one is red?"}]),
             processor_prompt(proc, [{"type": "image", "image": im} for im in images]
                              + [{"type": "text", "text": "vqa2: Which one is red?"}]),
             processor_prompt(proc, [{"type": "video", "video": frames}, {"type": "text", "text": "vqa2: What happens?"}],
                              video_metadata=[dict(total_num_frames=6, fps=1.0)], num_frames=4)]
    for row, inputs in enumerate(alone):
        single = model_batch(inputs)
        want = np.asarray(model(**{k: jnp.asarray(v) for k, v in single.items()})["logits"])
        n = inputs["input_ids"].shape[1]
        np.testing.assert_allclose(logits[row, :n], want[0, :n], atol=1e-5, rtol=1e-5)


def test_media_records_that_cannot_be_trained_are_named(setup):
    cfg, proc = setup
    images, frames = media()
    make = Molmo2Examples(proc, SEQ, max_images=2, max_frames=4)
    with pytest.raises(FormatError, match="images or a video, not both"):
        make({"image": images[0], "video": frames, "message_list": [question()]})
    with pytest.raises(SequenceError, match="3 images in a record; data.max_images is 2"):
        make({"image": images + images[:1], "message_list": [question()]})
    with pytest.raises(FormatError, match="data.max_frames is 0"):
        Molmo2Examples(proc, SEQ)({"video": frames, "message_list": [question()]})
    with pytest.raises(FormatError, match="needs 'times': the second of each of its 1 points"):
        make({"video": frames, "message_list": [{"style": "pointing", "label": "a", "question": "Point.",
                                                 "points": [[1.0, 2.0]]}]})
    with pytest.raises(FormatError, match="image_index 3 outside the record's 2 image"):
        make({"image": images, "message_list": [dict(question(), image_index=3)]})
    # a batch laid out for one image refuses a row of two (the loader skips such records by this error)
    collate = Molmo2Collator(proc.image, SEQ, 2)
    with pytest.raises(SequenceError, match="data.max_images"):
        collate([make({"image": images, "message_list": [question()]})])


def test_video_pointing_counting_and_tracking_targets(setup):
    """Points of a video conversation go to the sampled frame nearest their time (written as that frame's
    time, as the prompt shows it), in time order; one farther than half a frame interval from every sampled
    frame is left out; tracks keep their ids; counting counts distinct objects. The answers parse back to
    the same frames, ids and pixels (to the thousandths' rounding)."""
    from molmo_jax.molmo2_points import parse_molmo2_points

    cfg, proc = setup
    _, frames = media()
    make = Molmo2Examples(proc, SEQ, max_frames=4)

    def answer(conv):
        ex = make({"video": frames, "fps": 1.0, "message_list": [conv]})
        text = proc.tokenizer.decode(ex["target_tokens"][ex["loss_masks"] > 0], skip_special_tokens=True)
        return text, ex["metadata"]["frame_times"]

    _, stamps = answer({"style": "vqa2", "question": "What happens?", "answer": "it moves"})
    assert len(stamps) == 4 and stamps[0] == 0.0
    t = [float(x) for x in stamps]
    point = {"style": "pointing", "label": "Dogs", "question": "Point to the dogs.",
             "points": [[16.0, 36.0], [32.0, 24.0], [8.0, 8.0]], "times": [t[2] + 0.1, t[0], 100.0]}
    text, _ = answer(point)
    assert text == f'<points coords="{t[0]:.1f} 2 500 500;{t[2]:.1f} 1 250 750" alt="dogs">dogs</points>', text
    parsed = parse_molmo2_points(text, 64, 48)
    np.testing.assert_allclose(parsed.frames, [round(t[0], 1), round(t[2], 1)])
    np.testing.assert_allclose(parsed.points, [[32.0, 24.0], [16.0, 36.0]], atol=0.05)
    # the two points on sampled frames are one object (id 1); object 3 is only on the left-out point
    text, _ = answer(dict(point, style="point_count", ids=[1, 1, 3]))
    assert text.startswith("Counting the <points") and text.endswith("shows a total of 1."), text
    text, _ = answer(dict(point, style="point_count"))
    assert text.endswith("shows a total of 2."), text
    track = {"style": "tracking", "label": "ball", "question": "Track the ball.", "points": [[32.0, 24.0]] * 3,
             "times": [t[1], t[0], t[1]], "ids": [1, 1, 2]}
    text, _ = answer(track)
    assert text == f'<tracks coords="{t[0]:.1f} 1 500 500;{t[1]:.1f} 1 500 500 2 500 500" alt="ball">ball</tracks>'
    with pytest.raises(FormatError, match="'tracking' conversation needs 'ids'"):
        answer({k: v for k, v in track.items() if k != "ids"})
    with pytest.raises(FormatError, match="within half a frame interval"):
        answer(dict(point, times=[100.0, 200.0, 300.0]))
    with pytest.raises(FormatError, match="'ids' must be 3 non-negative integers"):
        answer(dict(track, ids=[1, 2]))
    with pytest.raises(FormatError, match="'tracking' conversation on a record without a video"):
        Molmo2Examples(proc, SEQ)({"image": frames[0], "message_list": [track]})


def test_molmo_refuses_several_image_settings():
    from input_pipeline.loader import LoaderSettings, example_makers
    from molmo_jax.recipe import validate

    cfg = config_lib.get_config("tiny")
    settings = LoaderSettings(global_batch=2, seq_len=64, seed=0, tokenizer="", max_images=2)
    with pytest.raises(ValueError, match="several images and videos are Molmo2's"):
        example_makers(cfg, settings)
    from configs import molmo2_tiny_sft
    config = molmo2_tiny_sft.get_config()
    config.data.update(max_images=0, max_frames=-1)
    problems = validate(config)
    assert "data.max_images: must be >= 1, got 0" in problems and "data.max_frames: must be >= 0, got -1" in problems


def test_aot_batch_has_the_collators_layout_with_videos():
    import jax
    from configs import molmo2_tiny_sft
    from molmo_jax.analysis.aot import abstract_batch

    config = molmo2_tiny_sft.get_config()
    config.data.update(max_images=2, max_frames=4)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "tensor", "expert"))
    spec = abstract_batch(config, mesh)
    proc = processor_for(config.model, MOLMO2_TINY_TOKENIZER, max_crops=config.data.max_crops)
    collate = Molmo2Collator(proc.image, config.seq_len, config.batch_size, video_settings=proc.video, max_images=2,
                             max_frames=4)
    lay = collate.layout
    b = config.batch_size
    assert spec["pixel_values"].shape == (b * lay.crops, lay.patches, lay.pixels)
    assert spec["image_token_pooling"].shape == (b * lay.rows, 9)


def test_vqa_builder_stores_several_images_and_videos_and_the_loader_trains_on_them(tmp_path):
    """JSONL rows with `images` / `video` (a frames folder) -> TFDS records -> a Molmo2 training batch."""
    import io

    from PIL import Image

    from configs import molmo2_tiny_sft
    from input_pipeline import make_train_iterator
    from tools import build_data

    source = tmp_path / "src"
    (source / "clip").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def png(path, w, h):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
        return path.read_bytes()

    a, b = png(source / "a.png", 40, 30), png(source / "b.png", 30, 40)
    frames = [png(source / "clip" / f"{k:02d}.png", 32, 24) for k in (2, 0, 1)]
    rows = [{"images": ["a.png", "b.png"], "question": "Which is wider?", "answer": "the first"},
            {"video": "clip", "fps": 2, "question": "What moves?", "answer": "nothing"},
            {"video": "clip", "fps": 2, "style": "tracking", "question": "Track the dot.", "label": "dot",
             "points": [[8, 6], [16, 12]], "times": [0.0, 0.5], "ids": [1, 1]},
            {"video": "clip", "style": "tracking", "question": "Bad?", "points": [[1, 2, 3]]},
            {"video": "nowhere", "question": "Lost?", "answer": "no"},
            {"image": "a.png", "question": "One?", "answer": "yes"}]
    (source / "train.jsonl").write_text("\n".join(__import__("json").dumps(r) for r in rows))
    data = tmp_path / "data"
    assert build_data.main(["vqa", "--name", "media", "--data-dir", str(data), "--source", str(source)]) == 0
    from input_pipeline import datasets
    spec = datasets.spec("vqa:media")
    stored = datasets.open_source(datasets.dataset_dir(str(data), spec), "train")
    import collections
    examples = [spec.convert(stored[i], np.random.default_rng(i), collections.Counter()) for i in range(len(stored))]
    by_kind = {("video" if "video" in e else "images" if isinstance(e["image"], list) else "image"): e for e in examples}
    assert sorted(by_kind) == ["image", "images", "video"]  # the missing frames folder was skipped
    assert by_kind["images"]["image"] == [a, b] and by_kind["image"]["image"] == a
    assert by_kind["video"]["video"] == [frames[1], frames[2], frames[0]] and by_kind["video"]["fps"] == 2.0
    track = by_kind["video"]["message_list"][1]   # the malformed points row was skipped
    assert len(by_kind["video"]["message_list"]) == 2 and track["times"] == [0.0, 0.5] and track["ids"] == [1, 1]
    proc = processor_for(molmo2_tiny_sft.get_config().model, MOLMO2_TINY_TOKENIZER)
    ex = Molmo2Examples(proc, SEQ, max_frames=4)(dict(by_kind["video"], message_list=[track]))
    trained = proc.tokenizer.decode(ex["target_tokens"][ex["loss_masks"] > 0], skip_special_tokens=True)
    assert trained == '<tracks coords="0.0 1 250 250;0.5 1 500 500" alt="dot">dot</tracks>', trained
    config = molmo2_tiny_sft.get_config()
    config.data.update(kind="mixture", mixture="vqa:media:1.0", data_dir=str(data), max_images=2, max_frames=4)
    config.update(batch_size=3, seq_len=SEQ)
    loader = make_train_iterator(config)
    batch = next(loader)
    state = loader.get_state()
    loader.close()
    cfg = config.model
    check_token_counts(cfg, batch)
    assert not any("skipped" in k for k in state["counts"]), state["counts"]
    assert int((batch["input_ids"] == cfg.tokens.image_patch).sum()) > 0 and batch["image_token_pooling"].shape[1] == 9
