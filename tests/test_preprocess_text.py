"""Tokenizer wrapper and prompt formatting."""
import json

import numpy as np
import pytest

from molmo_jax.preprocess import FormatError, FormatSettings, MolmoTokenizer, TokenizerError, format_conversation
from molmo_jax.preprocess import templates
from molmo_jax.preprocess.formatting import most_frequent_answer


@pytest.fixture(scope="module")
def tok_dir(golden_dir):
    return golden_dir / "tiny-qwen2-style-tokenizer"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return MolmoTokenizer(str(tok_dir), 152064)


def rng(seed=0):
    return np.random.default_rng(seed)


# -- tokenizer ------------------------------------------------------------------------------------

def test_tokenizer_ids_match_golden(golden_dir, tok):
    st = json.load(open(golden_dir / "preprocess" / "settings.json"))
    g = np.load(golden_dir / "preprocess" / "img_50x80.npz")
    assert tok.encode(st["formatted_messages"][0]) == g["text_token_ids"].tolist()
    assert (tok.eos_id, tok.bos_id) == (st["eos_token_id"], st["bos_token_id_used"])
    ids = st["special_token_ids"]
    assert (tok.im_start, tok.im_end, tok.im_patch, tok.im_col, tok.image) == \
        (ids["<im_start>"], ids["<im_end>"], ids["<im_patch>"], ids["<im_col>"], ids["<|image|>"])
    assert tok.base_size == 385 and len(tok) == 152069


def test_tokenizer_padding_for_model_vocab_sizes(tok_dir):
    for vocab in (500, 512):
        t = MolmoTokenizer(str(tok_dir), vocab)
        assert t.im_start == vocab and t.image == vocab + 4
        assert t.token_string(385) == "|<EXTRA_TOKENS_0>|"
        assert t.token_string(vocab - 1) == f"|<EXTRA_TOKENS_{vocab - 1 - 385}>|"
    with pytest.raises(TokenizerError, match="more than the model's vocab_size 300"):
        MolmoTokenizer(str(tok_dir), 300)


def test_special_token_strings_encode_to_their_ids(tok):
    ids = tok.encode(" User: <|image|> What is this? Assistant:")
    assert ids.count(tok.image) == 1
    before, after = ids[:ids.index(tok.image)], ids[ids.index(tok.image) + 1:]
    assert before == tok.encode(" User: ") and after == tok.encode(" What is this? Assistant:")
    assert tok.encode("<im_start><im_patch><im_col><im_end>") == [tok.im_start, tok.im_patch, tok.im_col, tok.im_end]
    assert tok.encode("|<EXTRA_TOKENS_3>|") == [388]
    assert tok.encode("<|endoftext|>") == [tok.eos_id]


def test_decode_drops_bos_stops_at_eos_and_skips_specials(tok):
    text = " The circle is blue."
    ids = tok.encode(text)
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id] + tok.encode(" garbage")) == text
    assert tok.decode(ids + [tok.im_patch, 400]) == text
    assert tok.decode(ids + [400], skip_special_tokens=False) == text + "|<EXTRA_TOKENS_15>|"
    assert tok.decode(np.array([ids + [-1, -1]])) == text      # padding ignored, any array shape


def test_tokenizer_errors(tmp_path, tok_dir):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        MolmoTokenizer(str(tmp_path), 1000)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be loaded"):
        MolmoTokenizer(str(tmp_path), 1000)
    # A direct path to tokenizer.json works too.
    assert MolmoTokenizer(str(tok_dir / "tokenizer.json"), 512).eos_id == 384


# -- formatting -----------------------------------------------------------------------------------

def test_demo_style_inference_and_training():
    conv = {"style": "demo", "question": "Describe this image.", "answer": "A red square."}
    assert format_conversation(conv, rng(), for_inference=True) == [" User: Describe this image. Assistant:"]
    assert format_conversation(conv, rng()) == [" User: Describe this image. Assistant:", " A red square."]


def test_academic_style_prefix_and_aliases():
    conv = {"style": "vqa2", "question": "What color is the cat?", "answer": "white"}
    assert format_conversation(conv, rng()) == [" User: vqa2: What color is the cat? Assistant:", " white"]
    conv = {"style": "eval_short_answer", "question": "Q?"}
    assert format_conversation(conv, rng(), for_inference=True) == [" User: vqa2: Q? Assistant:"]


def test_demo_styles_get_a_prefix_ten_percent_of_the_time():
    conv = {"style": "user_qa", "question": "Hi?", "answer": "Hello."}
    prefixed = [format_conversation(conv, rng(s))[0].startswith(" User: user_qa: ") for s in range(2000)]
    assert 0.07 < np.mean(prefixed) < 0.13
    # Deterministic per seed (evaluation prompts must not change between runs).
    assert all(format_conversation(conv, rng(s)) == format_conversation(conv, rng(s)) for s in range(20))


def test_other_system_prompt_kinds():
    conv = {"style": "user_qa", "question": "Hi?", "answer": "Hello."}
    assert format_conversation(conv, rng(), FormatSettings(system_prompt="style"))[0] == " User: user_qa: Hi? Assistant:"
    assert format_conversation(conv, rng(), FormatSettings(system_prompt="none"))[0] == " User: Hi? Assistant:"
    plain = FormatSettings(message_format="none", always_start_with_space=False, system_prompt="none")
    assert format_conversation(conv, rng(), plain) == ["Hi?", " Hello."]


def test_stage1_length_hints():
    s1 = FormatSettings.stage1()
    caption = "x" * 300
    conv = {"style": "long_caption", "text": caption}
    hints = []
    for seed in range(400):
        user, target = format_conversation(conv, rng(seed), s1)
        assert target == " " + caption
        assert user.startswith(" long_caption ") and user.endswith(":")
        hints.append(user[len(" long_caption "):-1])
    numeric = [int(h) for h in hints if h]
    assert 0.85 < len(numeric) / len(hints) < 0.95          # 10% get "long_caption :"
    assert abs(np.mean(numeric) - 300 / 15) < 1.0           # n = len + N(0, 25), then // 15
    assert format_conversation(conv, rng(), s1, for_inference=True) == [" long_caption 65:"]
    assert format_conversation({"style": "transcript", "text": "um so"}, rng(), s1, for_inference=True) == \
        [" transcript 65:"]


def test_caption_templates_and_sizes():
    assert (len(templates.LONG_CAPTION), len(templates.POINTING), len(templates.POINT_COUNT)) == (23, 43, 57)
    for lst in templates.TEMPLATES.values():
        assert len(set(lst)) == len(lst)
    for lst in (templates.POINTING, templates.POINT_COUNT):
        assert all("{label}" in t for t in lst)
    seen = set()
    for seed in range(300):
        user, target = format_conversation({"style": "long_caption", "text": "A cat."}, rng(seed),
                                           FormatSettings(system_prompt="none"))
        seen.add(user[len(" User: "):-len(" Assistant:")])
        assert target == " A cat."
    assert seen == set(templates.LONG_CAPTION)


def test_multiple_choice_lettered_and_unlettered():
    conv = {"style": "a_okvqa_mc", "question": "Which?", "options": ["cat", "dog", "cow"], "answer": "dog"}
    user, target = format_conversation(conv, rng())
    assert user == " User: a_okvqa_mc: Which?\nA: cat\nB: dog\nC: cow\n Assistant:"
    assert target == " B"
    conv = dict(conv, style="ai2_diagram_no_letter", answer=2)
    user, target = format_conversation(conv, rng())
    assert user == " User: ai2_diagram_no_letter: Which?\ncat\ndog\ncow\n Assistant:" and target == " cow"
    with pytest.raises(FormatError, match="not one of the options"):
        format_conversation(dict(conv, answer="pig"), rng())


def test_multi_reference_answers_take_the_most_frequent():
    conv = {"style": "vqa2", "question": "Q?", "answers": ["2", "two", "2", "3"]}
    assert format_conversation(conv, rng())[1] == " 2"
    ties = {most_frequent_answer(["a", "b", "a", "b", "c"], rng(s)) for s in range(50)}
    assert ties == {"a", "b"}


def test_multi_turn_messages_and_prompt_field():
    conv = {"style": "synthetic_qa", "messages": ["Q1?", "A1.", "Q2?", "A2."]}
    out = format_conversation(conv, rng())
    assert out == [" User: synthetic_qa: Q1? Assistant:", " A1.", " User: Q2? Assistant:", " A2."]
    assert format_conversation(conv, rng(), for_inference=True)[-1] == " User: Q2? Assistant:"
    conv = {"style": "android_control", "prompt": "low_level: tap", "answer": "click"}
    assert format_conversation(conv, rng()) == [" User: low_level: tap Assistant:", " click"]


def test_pointing_and_counting_targets():
    from molmo_jax import points as points_lib

    pts = np.array([[50.0, 20.0], [10.0, 40.0]])
    conv = {"style": "pointing", "label": "Mug", "points": pts, "point_scale": 100.0}
    settings = FormatSettings(system_prompt="none")
    user, target = format_conversation(conv, rng(3), settings)
    prompt = user[len(" User: "):-len(" Assistant:")]
    assert prompt in {t.format(label="mug") for t in templates.POINTING}
    assert target == " " + points_lib.points_to_text(pts, "mug", "mug")
    count = dict(conv, style="point_count")
    assert format_conversation(count, rng(), settings)[1] == \
        " Counting the " + points_lib.points_to_text(pts, "mug", "mug") + " shows a total of 2."
    # Pixel points are converted with the image size; no points -> "There are none."
    px = dict(conv, points=pts * 2, point_scale=0, question="Point to the mug.")
    assert format_conversation(px, rng(), settings, image_size=(200, 200)) == \
        [" User: Point to the mug. Assistant:", " " + points_lib.points_to_text(pts, "mug", "mug")]
    empty = dict(conv, points=np.zeros((0, 2)))
    assert format_conversation(empty, rng(), settings)[1] == " There are none."
    with pytest.raises(FormatError, match="image size"):
        format_conversation(dict(px, question=None), rng(), settings)


def test_bad_conversations_raise_format_errors():
    with pytest.raises(FormatError, match="no 'style'"):
        format_conversation({"question": "Q"}, rng())
    with pytest.raises(FormatError, match="needs a target"):
        format_conversation({"style": "vqa2", "question": "Q"}, rng())
    with pytest.raises(FormatError, match="no prompt templates"):
        format_conversation({"style": "vqa2", "answer": "A"}, rng())
    with pytest.raises(ValueError, match="system_prompt"):
        FormatSettings(system_prompt="bogus")
