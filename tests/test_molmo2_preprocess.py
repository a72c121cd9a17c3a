"""Molmo2 preprocessing against transformers' Molmo2Processor (images, videos, chat format, token layout),
Molmo2 points, and bad inputs (docs/architecture.md#molmo2-preprocessing)."""
import importlib.util
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from molmo_jax.molmo2_points import (draw_molmo2_points, molmo2_points_to_text, nearest_frames,
                                     parse_molmo2_points)
from molmo_jax.points import parse_count
from molmo_jax.preprocess.molmo2_chat import format_chat
from molmo_jax.preprocess.molmo2_image import Molmo2ImageSettings
from molmo_jax.preprocess.molmo2_processor import Molmo2Processor, Molmo2Tokenizer
from molmo_jax.preprocess.molmo2_video import Molmo2VideoSettings, VideoMetadata, sample_frames
from molmo_jax.preprocess.resize import resize_chw
from molmo_jax.preprocess.tokenizer import TokenizerError

TOKENIZER = pathlib.Path(__file__).parents[1] / "molmo_jax" / "assets" / "molmo2_tiny_tokenizer"
PIXEL_ATOL = 1e-5       # measured: 0 (bit-identical) for every case below


@pytest.fixture(scope="module")
def reference():
    """transformers' Molmo2Processor with the released options. The released video config rescales and
    normalises (the class defaults would leave frames as uint8). With one torch thread torch resizes with
    another kernel whose float rounding differs; two threads select the kernel everyone else runs."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("transformers' Molmo2 processors need torchvision: `make install` puts it in "
                    ".venv/test-torchvision (see tests/conftest.py)")
    from transformers import AutoTokenizer
    from transformers.models.molmo2 import Molmo2ImageProcessor, Molmo2Processor as Reference, Molmo2VideoProcessor
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield Reference(image_processor=Molmo2ImageProcessor(),
                    video_processor=Molmo2VideoProcessor(do_rescale=True, do_normalize=True, do_convert_rgb=True),
                    tokenizer=AutoTokenizer.from_pretrained(str(TOKENIZER)))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ours():
    return Molmo2Processor(str(TOKENIZER))


def _images(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]


def assert_same(ref, out):
    """Same keys, shapes and dtypes; ids and indices equal; pixels within PIXEL_ATOL."""
    assert sorted(out) == sorted(k for k in ref if k != "video_metadata")
    for key, value in out.items():
        expected = np.asarray(ref[key])
        assert value.shape == expected.shape and value.dtype == expected.dtype, key
        if value.dtype.kind == "f":
            assert np.abs(value - expected).max() <= PIXEL_ATOL, key
        else:
            np.testing.assert_array_equal(value, expected, err_msg=key)


# ----------------------------------------------------------------------------------------------
# Pixels, tables and tokens against transformers

@pytest.mark.parametrize("shape", [(300, 500, 130, 1100), (13, 7, 378, 378), (900, 260, 378, 378),
                                   (378, 378, 378, 378), (40, 900, 378, 2240), (1, 1, 5, 300)])
def test_plain_bilinear_resize_is_bit_identical_to_torch(shape):
    h, w, oh, ow = shape
    x = np.random.default_rng(h + w).integers(0, 256, (3, h, w)).astype(np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], (oh, ow), mode="bilinear",
                                              align_corners=False, antialias=False)[0].numpy()
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(resize_chw(x, oh, ow, antialias=False), ref)


@pytest.mark.parametrize("shape", [(300, 60, 3), (50, 400, 3), (10, 12, 3), (900, 1300, 3), (378, 378, 3),
                                   (120, 90, 4), (70, 80, 1)], ids=["tall", "wide", "tiny", "large", "square",
                                                                    "rgba", "grey"])
def test_one_image_matches_transformers(reference, ours, shape):
    image = _images(shape, seed=shape[0])
    prompt = "<|image|><|im_start|>user\nPoint to the cat.<|im_end|>\n<|im_start|>assistant\n"
    assert_same(reference(images=image, text=prompt, return_tensors="np"), ours(images=image, text=prompt))


def test_pil_image_matches_transformers(reference, ours):
    image = Image.fromarray(_images((90, 140, 3), seed=9)[0])
    assert_same(reference(images=image, text="<|image|>", return_tensors="np"), ours(images=image, text="<|image|>"))


def test_several_images_and_prompts_match_transformers(reference, ours):
    images = _images((60, 80, 3), (500, 200, 3), (60, 80, 3), seed=1)   # two of one shape share a batch there
    prompts = ["Image 1<|image|>Image 2<|image|><|im_start|>user\nCompare them.<|im_end|>\n",
               "<|image|>A shorter prompt, padded on the right"]
    assert_same(reference(images=images, text=prompts, padding=True, return_tensors="np"),
                ours(images=images, text=prompts))
    assert_same(reference(images=images, return_tensors="np"), ours(images=images))


@pytest.mark.parametrize("case", ["no_metadata", "fps_29.97", "num_frames", "sample_fps", "unsampled"])
def test_video_frames_match_transformers(reference, ours, case):
    frames = list(_images((150, 24, 32, 3), seed=7)[0])
    options, reference_options = {}, {}
    if case == "no_metadata":
        frames = frames[:9]                    # fps unknown: sampled and timed at max_fps
    elif case == "fps_29.97":
        options = {"video_metadata": [{"total_num_frames": 150, "fps": 29.97}]}     # 10 frames, 0.5 s apart
    elif case == "num_frames":
        options = {"video_metadata": [{"total_num_frames": 150, "fps": 10.0}], "num_frames": 6}
    elif case == "sample_fps":
        options = {"video_metadata": [{"total_num_frames": 150, "fps": 30.0}], "fps": 1.3}
        reference_options = {"num_frames": None}   # else its default num_frames collides with fps
    else:
        frames = frames[:5]
        options = {"do_sample_frames": False, "video_metadata": [{"total_num_frames": 5, "fps": 3.0,
                                                                  "frames_indices": [0, 3, 6, 9, 12]}]}
    prompt = "Watch<|video|><|im_start|>user\nWhat happens?<|im_end|>\n"
    ref = reference(videos=[frames], text=prompt, return_tensors="np", **options, **reference_options)
    out = ours(videos=[frames], text=prompt, **options)
    assert_same(ref, out)
    assert out["video_token_pooling"].shape[1] == 9 and out["video_grids"][0, 1:].tolist() == [9, 9]


def test_checkpoint_options_match_transformers(reference, tmp_path):
    """Non-default options read from a checkpoint's config files, against transformers built with them."""
    import json
    import shutil

    from transformers.models.molmo2 import Molmo2ImageProcessor, Molmo2Processor as Reference, Molmo2VideoProcessor
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, tmp_path / name)
    image = {"max_crops": 3, "overlap_margins": [2, 6], "pooling_size": [3, 2], "image_mean": [0.4, 0.5, 0.6],
             "image_std": [0.2, 0.3, 0.25]}
    video = {"num_frames": 4, "max_fps": 1, "pooling_size": [2, 2], "size": {"height": 224, "width": 224}}
    text = {"use_single_crop_col_tokens": False, "use_single_crop_start_token": False, "video_use_col_tokens": True,
            "use_frame_special_tokens": False}
    for name, config in (("preprocessor_config.json", image), ("video_preprocessor_config.json", video),
                         ("processor_config.json", text)):
        (tmp_path / name).write_text(json.dumps(config))
    ref = Reference(image_processor=Molmo2ImageProcessor(max_crops=3, overlap_margins=[2, 6], pooling_size=[3, 2],
                                                         image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]),
                    video_processor=Molmo2VideoProcessor(do_rescale=True, do_normalize=True, do_convert_rgb=True,
                                                         num_frames=4, max_fps=1, pooling_size=[2, 2],
                                                         size={"height": 224, "width": 224}),
                    tokenizer=reference.tokenizer, **text)
    image, video = _images((300, 700, 3), (20, 30, 40, 3), seed=11)
    metadata = [{"total_num_frames": 20, "fps": 4.0}]
    prompt = ["<|image|>Look.", "<|video|>And this."]
    assert_same(ref(images=[image], videos=[video], video_metadata=metadata, text=prompt, padding=True,
                    return_tensors="np"),
                Molmo2Processor.from_pretrained(str(tmp_path))(images=[image], videos=[video], text=prompt,
                                                               video_metadata=metadata))


def test_exported_processor_files_load_in_transformers_as_ours(reference, tmp_path):
    """The processor files an export writes (a tiny model's own crop size, crops and margins) make
    transformers' Molmo2Processor preprocess exactly as the model's own processor does."""
    import json
    import shutil

    from transformers.models.molmo2 import Molmo2Processor as Reference

    from molmo_jax import config as config_lib
    from molmo_jax.inference_molmo2 import processor_for
    from molmo_jax.weights.mappings.molmo2 import processor_files

    cfg = config_lib.get_config("molmo2_tiny")
    for name, content in processor_files(cfg).items():
        (tmp_path / name).write_text(json.dumps(content))
    for f in TOKENIZER.glob("*.json"):
        shutil.copy2(f, tmp_path / f.name)
    image, video = _images((70, 150, 3), (12, 30, 40, 3), seed=5)
    metadata = [{"total_num_frames": 12, "fps": 4.0}]
    prompt = ["<|image|>Look.", "<|video|>And this."]
    ref = Reference.from_pretrained(str(tmp_path))(images=[image], videos=[video], video_metadata=metadata,
                                                   text=prompt, padding=True, return_tensors="np")
    out = processor_for(cfg, str(TOKENIZER))(images=[image], videos=[video], text=prompt, video_metadata=metadata)
    # At crops under 70 px, torch's frame resize rounds a few values to the neighbouring 8-bit level
    # (measured: 19 of 56448 at this model's 56 px, none at 70, 112, 224 or the released 378 px).
    level = 2 / 255 + 1e-6   # one 8-bit level after normalising with std 0.5
    diff = np.abs(out.pop("pixel_values_videos") - ref.pop("pixel_values_videos"))
    assert diff.max() <= level and (diff > PIXEL_ATOL).mean() < 1e-3
    assert_same(ref, out)


def test_text_only_prompts_bos_and_left_padding_match_transformers(reference, ours):
    prompts = ["<|im_end|>Already starts with BOS.", "<|im_start|>user\nA longer question, with words.<|im_end|>\n"]
    assert_same(reference(text=prompts, padding=True, padding_side="left", return_tensors="np"),
                ours(text=prompts, padding_side="left"))


def test_video_forms_agree(ours):
    frames = list(_images((5, 16, 16, 3), seed=2)[0])
    as_list = ours(videos=frames, text="<|video|>")
    for other in (ours(videos=np.stack(frames), text="<|video|>"), ours(videos=[np.stack(frames)], text="<|video|>")):
        assert sorted(other) == sorted(as_list)
        assert all(np.array_equal(other[k], as_list[k]) for k in as_list)


def test_frame_sampling():
    s = Molmo2VideoSettings()
    meta = VideoMetadata(total_num_frames=300, fps=30.0)      # 10 s: max_fps 2 allows 20 frames
    assert sample_frames(meta, s).tolist() == list(range(0, 300, 15))
    meta = VideoMetadata(total_num_frames=1000)                # fps unknown: taken as max_fps, 64 frames
    assert sample_frames(meta, s)[:4].tolist() == [0, 15, 31, 46] and meta.fps == 2.0 and meta.duration == 500
    # 150 / (150 / 7) rounds to just over 7 steps; the reference then indexes frame 150 of 150 and fails.
    assert sample_frames(VideoMetadata(total_num_frames=150, fps=10.0), s, num_frames=7).tolist() == \
        [0, 21, 42, 64, 85, 107, 128]


def test_video_token_layout(ours):
    out = ours(videos=[_images((3, 20, 20, 3))[0]], text="<|video|>")
    text = ours.tokenizer.decode(out["input_ids"][0], skip_special_tokens=False)
    frame = "<frame_start>" + "<im_patch>" * 81 + "<frame_end>"
    assert text == f"<|im_end|>0.0 {frame} 0.5 {frame} 1.0 {frame}"
    assert out["mm_token_type_ids"][0].sum() == 3 * 83


def test_image_token_layout_and_pooling_tables(ours):
    out = ours(images=_images((10, 12, 3)), text="<|image|>")
    assert out["image_grids"].tolist() == [[14, 14, 14, 14]] and out["image_num_crops"].tolist() == [2]
    ids = out["input_ids"][0].tolist()
    t = ours.tokenizer.ids
    row = [t["<im_patch>"]] * 14 + [t["<im_col>"]]
    assert ids[1:] == ([t["<low_res_im_start>"]] + row * 14 + [t["<im_end>"]]
                       + [t["<im_start>"]] + row * 14 + [t["<im_end>"]])
    pooling = out["image_token_pooling"]
    assert pooling.shape == (2 * 14 * 14, 4) and pooling.dtype == np.int32
    # 27 patches per side pool 2x2 with one row / column of padding at the bottom / right
    assert pooling[0].tolist() == [0, 1, 27, 28] and pooling[13].tolist() == [26, -1, 53, -1]
    assert pooling[14 * 14 - 1].tolist() == [728, -1, -1, -1] and pooling[14 * 14].tolist() == [729, 730, 756, 757]


# ----------------------------------------------------------------------------------------------
# Chat format

IMAGE = np.zeros((20, 30, 3), np.uint8)
CHATS = [
    ([{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Point to the dog."}]}],
     "<|image|><|im_start|>user\nPoint to the dog.<|im_end|>\n<|im_start|>assistant\n"),
    ([{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "image", "image": IMAGE},
                                   {"type": "text", "text": "How many?", "style": "vqa2"},
                                   {"type": "text", "text": "Count them.", "style": "point_count"}]},
      {"role": "assistant", "content": "Two."},
      {"role": "user", "content": "And now?"}],
     "Image 1<|image|>Image 2<|image|><|im_start|>user\nvqa2: How many? Count them.<|im_end|>\n"
     " <|im_start|>assistant\nTwo.<|im_end|>\n<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n"),
    ([{"role": "subtitle", "content": "00:01 hello"},
      {"role": "user", "content": [{"type": "video", "video": [IMAGE] * 2}, {"type": "text", "text": "Who?"}]}],
     "<|video|>00:01 hello<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"),
]


@pytest.mark.parametrize("messages, prompt", CHATS, ids=["one_image", "two_images_history_styles", "video_subtitle"])
def test_chat_format(messages, prompt):
    assert format_chat(messages, add_generation_prompt=True) == prompt
    assert format_chat(messages) == prompt[:-len("<|im_start|>assistant\n")]


def test_apply_chat_template_equals_transformers_on_its_prompt(reference, ours):
    image, video = _images((90, 160, 3), (4, 30, 40, 3), seed=3)
    for messages in ([{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": "Point to the boats."}]}],
                     [{"role": "user", "content": [{"type": "video", "video": video},
                                                   {"type": "text", "text": "Track the ball."}]}]):
        prompt = ours.apply_chat_template(messages, add_generation_prompt=True)
        media = {"images": [image]} if "image" in messages[0]["content"][0] else {"videos": [video]}
        assert_same(reference(text=prompt, return_tensors="np", **media),
                    ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


# ----------------------------------------------------------------------------------------------
# Points

def test_parse_points_of_example_answers():
    answer = ('Counting the <points coords="1 1 073 160 2 173 600 3 258 725 4 323 735 5 353 160" alt="boats">'
              'the boats</points> shows a total of 5.')
    p = parse_molmo2_points(answer, 1000, 500)
    np.testing.assert_allclose(p.points, [[73, 80], [173, 300], [258, 362.5], [323, 367.5], [353, 80]])
    assert p.frames.tolist() == [1] * 5 and p.ids.tolist() == [1, 2, 3, 4, 5] and p.count == 5
    assert p.alts == ["boats"] * 5 and p.texts == ["the boats"] * 5 and parse_count(answer) == 5
    track = '<tracks coords="0.0 1 500 250 2 120 300;0.5 1 510 260">players</tracks>'
    p = parse_molmo2_points(track, 640, 480)
    np.testing.assert_allclose(p.points, [[320, 120], [76.8, 144], [326.4, 124.8]])
    assert p.frames.tolist() == [0.0, 0.0, 0.5] and p.ids.tolist() == [1, 2, 1] and p.kinds == ["tracks"] * 3
    # Several images of their own sizes; image 3 does not exist, x = 1001 lies outside, a cut-off tail is ignored.
    p = parse_molmo2_points('<points coords="1 1 500 500;2 1 100 900 2 1001 100;3 1 100 100"/> and '
                            '<points alt="x" coords="1 4 100 200 5 3', [100, 200], [50, 60])
    np.testing.assert_allclose(p.points, [[50, 25], [20, 54], [10, 10]])
    assert p.frames.tolist() == [1, 2, 1] and p.dropped == 2 and p.alts == [None, None, "x"]
    empty = parse_molmo2_points("There are none.", 10, 10)
    assert empty.num_points == 0 and empty.points.shape == (0, 2)


@pytest.mark.parametrize("case", ["image", "images", "video"])
def test_points_round_trip(case):
    rng = np.random.default_rng(5)
    n, (w, h) = 6, (640, 480)
    points = rng.uniform(0, 1, (n, 2)) * [w, h]
    ids = np.arange(1, n + 1)
    if case == "image":
        frames, fmt = np.ones(n), None
    elif case == "images":
        frames, fmt = np.array([1, 1, 2, 2, 2, 1]), None
    else:
        frames, fmt, ids = np.array([0.0, 0.0, 0.5, 0.5, 1.0, 1.0]), ".1f", np.array([1, 2, 1, 2, 1, 2])
    text = molmo2_points_to_text(frames, ids, points, w, h, alt="cups", text="cups", time_format=fmt,
                                 tag="tracks" if case == "video" else "points")
    p = parse_molmo2_points(f"Here: {text}.", w, h)
    order = np.lexsort((ids, frames))   # the text groups points by frame
    assert p.frames.tolist() == frames[order].tolist() and p.ids.tolist() == ids[order].tolist()
    assert np.abs(p.points - points[order]).max() <= 0.5 * max(w, h) / 1000   # thousandths, rounded
    assert p.alts == ["cups"] * n and p.texts == ["cups"] * n


def test_draw_points_on_their_image_or_nearest_frame(tmp_path):
    frames = [np.zeros((40, 60, 3), np.uint8) for _ in range(3)]
    p = parse_molmo2_points('<tracks coords="0.4 1 500 500 2 100 100;1.1 1 900 900">x</tracks>', 60, 40)
    assert nearest_frames(p.frames, [0.0, 0.5, 1.0]).tolist() == [1, 1, 2]
    paths = draw_molmo2_points(frames, p, str(tmp_path), timestamps=[0.0, 0.5, 1.0], radius=2)
    assert [pathlib.Path(q).name for q in paths] == ["points_001.png", "points_002.png"]
    first = np.asarray(Image.open(paths[0]))
    assert tuple(first[20, 30]) != tuple(first[4, 6]) and first[20, 30].any() and first[4, 6].any()  # ids differ
    image_paths = draw_molmo2_points(frames[0], parse_molmo2_points('<points coords="1 1 500 500"/>', 60, 40),
                                     str(tmp_path / "img"))
    assert np.asarray(Image.open(image_paths[0]))[20, 30].any()


# ----------------------------------------------------------------------------------------------
# Bad input: one ValueError line naming the problem

@pytest.mark.parametrize("call, message", [
    (lambda p: p(images=[np.zeros((20, 30, 3), np.float32)], text="<|image|>"), r"image 1 of 1: .*uint8.*float32"),
    (lambda p: p(images=[np.zeros((20, 30, 2), np.uint8)], text="<|image|>"), r"image 1 of 1: .*\[20, 30, 2\]"),
    (lambda p: p(images=[np.zeros((0, 30, 3), np.uint8)], text="<|image|>"), r"\[0, 30, 3\]"),
    (lambda p: p(images=[3], text="<|image|>"), r"image 1 of 1: image of type int: expected a path"),
    (lambda p: p(videos=[[]], text="<|video|>"), r"video 1 of 1: no frames"),
    (lambda p: p(videos=[[np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)]], text="<|video|>"),
     r"frames differ in size"),
    (lambda p: p(text="<|image|>", resolution=3), r"unknown option\(s\) resolution"),
    (lambda p: Molmo2Processor(str(TOKENIZER), max_crop=4), r"unknown option\(s\) max_crop"),
    (lambda p: p(images=_images((20, 30, 3)), text="no marker"), r"0 <\|image\|> markers for 1 images"),
    (lambda p: p(videos=[_images((2, 8, 8, 3))[0]], text="<|video|>", fps=1, num_frames=2), r"mutually exclusive"),
    (lambda p: p(), r"nothing to process"),
    (lambda p: format_chat([{"role": "assistant", "content": "hi"}]), r"message 0: role 'assistant'"),
    (lambda p: Molmo2ImageSettings(crop_size=380), r"multiple of patch"),
    (lambda p: Molmo2VideoSettings(num_frames=0), r"num_frames must be >= 1"),
], ids=["dtype", "channels", "empty_image", "not_an_image", "empty_video", "frame_sizes", "unknown_option",
        "unknown_processor_option", "marker_count", "fps_and_num_frames", "no_input", "roles", "crop_size",
        "num_frames"])
def test_bad_input_is_one_clear_value_error(ours, call, message):
    with pytest.raises(ValueError, match=message) as err:
        call(ours)
    assert "\n" not in str(err.value)


def test_tokenizer_without_molmo2_tokens_is_refused():
    tiny = pathlib.Path(__file__).parents[1] / "molmo_jax" / "assets" / "tiny_tokenizer"
    with pytest.raises(TokenizerError, match="not a Molmo2 tokenizer, it lacks <im_start>"):
        Molmo2Tokenizer(str(tiny))
