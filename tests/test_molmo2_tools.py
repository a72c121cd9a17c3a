"""Molmo2 through the tools: tools.infer on one image, several images and a video (a folder of frames)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from input_pipeline import MOLMO2_TINY_TOKENIZER
from molmo_jax import config as config_lib
from molmo_jax import weights
from molmo_jax.inference_molmo2 import Molmo2Answerer, model_batch
from molmo_jax.models import create_model
from molmo_jax.preprocess import TokenizerError
from molmo_jax.preprocess.molmo2_processor import Molmo2Tokenizer
from tools import infer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = config_lib.get_config("molmo2_tiny")
    cfg.attention = "dense"
    model = create_model(cfg, 3)
    path = weights.save_model(tmp_path_factory.mktemp("molmo2") / "model", cfg, model,
                              tokenizer_dir=MOLMO2_TINY_TOKENIZER)
    return path, cfg, model


def pictures(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    paths = []
    for k, (w, h) in enumerate(sizes):
        paths.append(folder / f"frame_{k:02d}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return [str(p) for p in paths]


def run(capsys, *args):
    infer.main(list(args) + ["--json", "--max-new-tokens", "6"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def create_tiny_molmo():
    cfg = config_lib.get_config("tiny")
    return cfg, create_model(cfg, 0)


def first_token(cfg, model, answerer, **ask):
    """The greedy first token of a full (cache-free) forward on the processor's inputs."""
    inputs, _ = answerer.inputs("What is this?", **ask)
    batch = model_batch(inputs)
    logits = model(**{k: jnp.asarray(v) for k, v in batch.items()})["logits"]
    last = int((batch["input_ids"][0] >= 0).sum()) - 1
    return int(np.argmax(np.asarray(logits)[0, last, :cfg.llm.vocab_size + cfg.llm.additional_vocab_size]))


def test_infer_one_image_and_several(checkpoint, tmp_path, capsys):
    path, cfg, model = checkpoint
    a, b = pictures(tmp_path / "images", [(120, 80), (60, 90)])
    answerer = Molmo2Answerer(cfg, model, Molmo2Tokenizer(MOLMO2_TINY_TOKENIZER))
    one = run(capsys, "--checkpoint", str(path), "--image", a, "--prompt", "What is this?")
    assert one["sizes"] == [[120, 80]] and one["finish"] in ("eos", "length") and len(one["tokens"]) <= 6
    assert one["tokens"][0] == first_token(cfg, model, answerer, images=[a])
    two = run(capsys, "--checkpoint", str(path), "--image", a, "--image", b, "--prompt", "What is this?")
    assert two["sizes"] == [[120, 80], [60, 90]]
    assert two["tokens"][0] == first_token(cfg, model, answerer, images=[a, b])
    # the second image changes the prompt: its tokens are there (two image blocks)
    inputs, _ = answerer.inputs("What is this?", images=[a, b])
    starts = (inputs["input_ids"][0] == cfg.tokens.low_res_image_start).sum()
    assert starts == 2


def test_infer_video_frames_folder(checkpoint, tmp_path, capsys):
    path, cfg, model = checkpoint
    frames = pictures(tmp_path / "video", [(64, 48)] * 12)
    out = run(capsys, "--checkpoint", str(path), "--video", str(tmp_path / "video"), "--fps", "4",
              "--prompt", "What is this?")
    # 12 frames at 4 fps = 3 s, sampled at most at the config's 2 fps (and at most 8 frames): 6 frames
    assert out["frame_indices"] == [0, 2, 4, 6, 8, 10]
    np.testing.assert_allclose(out["timestamps"], [0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    answerer = Molmo2Answerer(cfg, model, Molmo2Tokenizer(MOLMO2_TINY_TOKENIZER))
    assert out["tokens"][0] == first_token(cfg, model, answerer, video=frames, fps=4.0)


def test_infer_molmo2_bad_input_is_one_line(checkpoint, tmp_path, capsys):
    path, cfg, model = checkpoint
    with pytest.raises(SystemExit, match="no image files"):
        (tmp_path / "empty").mkdir()
        infer.main(["--checkpoint", str(path), "--video", str(tmp_path / "empty"), "--prompt", "Hi"])
    with pytest.raises(SystemExit):
        infer.main(["--checkpoint", str(path), "--image", "x.png", "--fps", "2", "--prompt", "Hi"])
    assert "--fps goes with --video" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="a Molmo: it takes one --image"):
        molmo = weights.save_model(tmp_path / "molmo", *create_tiny_molmo())
        a, b = pictures(tmp_path / "images", [(32, 32), (32, 32)])
        infer.main(["--checkpoint", str(molmo), "--image", a, "--image", b, "--prompt", "Hi"])
    other = config_lib.get_config("molmo2_tiny")
    other.llm.update(vocab_size=380, embedding_size=380)
    other.tokens = config_lib.get_config("molmo2_tiny").tokens
    for key in other.tokens:
        other.tokens[key] -= 7
    with pytest.raises(TokenizerError, match="not this model's tokenizer"):
        Molmo2Answerer(other, model, Molmo2Tokenizer(MOLMO2_TINY_TOKENIZER))


# ------------------------------------------------------------------------------------------------
# Training data and the trainer

def test_training_example_layout():
    from molmo_jax.inference_molmo2 import processor_for
    from molmo_jax.preprocess.molmo2_example import Molmo2Collator, Molmo2Examples

    cfg = config_lib.get_config("molmo2_tiny")
    proc = processor_for(cfg, MOLMO2_TINY_TOKENIZER)
    image = np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8)
    record = {"image": image, "message_list": [
        {"style": "pointing", "label": "cats", "points": [[10.0, 20.0], [50.0, 35.0]]},
        {"style": "vqa2", "question": "What color?", "answer": "red"}]}
    make = Molmo2Examples(proc, seq_len=400)
    ex = make(record, np.random.default_rng(1))
    tok = proc.tokenizer
    trained = tok.decode(ex["target_tokens"][ex["loss_masks"] > 0], skip_special_tokens=False)
    # both answers and their EOS, nothing of the prompts; points in thousandths of the image size
    assert trained.count("<|im_end|>") == 2 and "red<|im_end|>" in trained
    assert '<points coords="1 1 100 286 2 500 500" alt="cats">cats</points><|im_end|>' in trained
    assert "What color" not in trained and "vqa2: What color?" in tok.decode(ex["input_ids"], False)
    np.testing.assert_array_equal(ex["target_tokens"][:-1], ex["input_ids"][1:])
    n_patch = int((ex["input_ids"] == cfg.tokens.image_patch).sum())
    assert n_patch == len(ex["image_token_pooling"]) > 0
    assert ex["mm_token_type_ids"][ex["input_ids"] == cfg.tokens.image_patch].all()
    # collated: the second row's pooling indices point into its own crops
    collate = Molmo2Collator(proc.image, seq_len=400, batch_size=3)
    batch = collate([ex, ex])
    crops, patches = collate.crops, collate.patches
    rows = collate.rows
    second = batch["image_token_pooling"][rows:rows + n_patch]
    np.testing.assert_array_equal(second, np.where(ex["image_token_pooling"] >= 0,
                                                   ex["image_token_pooling"] + crops * patches, -1))
    np.testing.assert_array_equal(batch["pixel_values"][crops:crops + len(ex["pixel_values"])], ex["pixel_values"])
    assert (batch["image_token_pooling"][2 * rows:] == -1).all() and (batch["input_ids"][2] == -1).all()
    from molmo_jax.models.molmo2 import check_token_counts
    check_token_counts(cfg, batch)


def test_fine_tune_then_ask(tmp_path, capsys):
    """tools.train on the synthetic PixMo, then tools.infer on the run."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "tools.train", "--config", "configs/molmo2_tiny_sft.py", "--workdir",
           str(tmp_path / "run"), "--config.total_steps=3", "--config.checkpoint_every=3", "--config.batch_size=2",
           "--config.seq_len=320", f"--config.data.data_dir={tmp_path / 'data'}",
           "--config.data.synthetic_split_sizes=train=16,validation=4,test=4", "--progress=false",
           "--config.eval_every=3", "--config.eval_examples=1", "--config.eval_batches=1"]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses)) and 4.0 < losses[0] < 7.0  # ~ln(403) at init
    evals = [r for r in rows if any(k.startswith("eval") for k in r)]
    assert len(evals) == 1, rows  # the periodic evaluation: validation loss and generation metrics
    image = pictures(tmp_path / "images", [(80, 60)])[0]
    answer = run(capsys, "--checkpoint", str(tmp_path / "run"), "--tokenizer", MOLMO2_TINY_TOKENIZER,
                 "--image", image, "--prompt", "Point to the squares.")
    assert answer["sizes"] == [[80, 60]] and len(answer["tokens"]) >= 1


def test_aot_batch_is_the_loaders_layout(tmp_path):
    """tools.aot compiles the step on the shapes and dtypes the loader yields."""
    import jax
    from configs import molmo2_tiny_sft
    from input_pipeline import make_train_iterator
    from molmo_jax.analysis.aot import abstract_batch

    config = molmo2_tiny_sft.get_config()
    config.data.update(synthetic_split_sizes="train=8,validation=4,test=4", data_dir=str(tmp_path))
    loader = make_train_iterator(config)
    real = next(loader)
    loader.close()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "tensor", "expert"))
    spec = abstract_batch(config, mesh)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in spec.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}


def test_batch_of_images_several_images_and_a_video(checkpoint, tmp_path, capsys):
    """A Molmo2 --batch answers each record as the single-prompt modes do; a bad record gets its error
    on its own line and the others are answered."""
    path, _, _ = checkpoint
    a, b = pictures(tmp_path / "images", [(120, 80), (60, 90)])
    pictures(tmp_path / "video", [(64, 48)] * 4, seed=1)
    singles = [run(capsys, "--checkpoint", str(path), "--image", a, "--prompt", "What is this?"),
               run(capsys, "--checkpoint", str(path), "--image", a, "--image", b, "--prompt", "What is this?"),
               run(capsys, "--checkpoint", str(path), "--video", str(tmp_path / "video"), "--fps", "2",
                   "--prompt", "What is this?")]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"image": "images/frame_00.png", "prompt": "What is this?"},
        {"image": [a, b], "prompt": "What is this?"},
        {"video": "video", "fps": 2, "prompt": "What is this?"},
        {"image": [], "prompt": "What is this?"},
        {"video": "images/frame_00.png", "prompt": "What is this?"}]) + "\n")
    out = tmp_path / "answers.jsonl"
    status = infer.main(["--checkpoint", str(path), "--batch", str(requests), "--out", str(out),
                         "--max-new-tokens", "6"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert status == 1 and [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    for row, single in zip(rows, singles):
        assert row["tokens"] == single["tokens"] and row.get("sizes") == single.get("sizes")
    assert "non-empty list of paths" in rows[3]["error"] and "not found" in rows[4]["error"]


@pytest.mark.parametrize("dataset, task", [("synthetic_pointing", "pointing"), ("synthetic_counting", "counting")])
def test_eval_a_molmo2_checkpoint(checkpoint, tmp_path, capsys, dataset, task):
    """tools.eval on a Molmo2 checkpoint: each prediction is the answerer's answer to the prompt training
    writes for that example, and each score is the metric's score of that prediction."""
    from input_pipeline.evaluation import make_eval_examples
    from molmo_jax.metrics import tasks
    from molmo_jax.preprocess import FormatSettings
    from molmo_jax.preprocess.molmo2_example import user_prompt
    from tools import eval as eval_tool

    path, cfg, model = checkpoint
    data, out = str(tmp_path / "data"), tmp_path / "eval"
    sizes = "train=4,validation=2,test=2"
    assert eval_tool.main(["--checkpoint", str(path), "--dataset", dataset, "--max-examples", "2", "--batch-size", "2",
                           "--data-dir", data, "--split-sizes", sizes, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    metrics = json.load(open(out / "metrics.json"))
    assert len(rows) == 2 and metrics[task]["n"] == 2
    from input_pipeline.builders.base import parse_split_sizes
    examples = list(make_eval_examples(dataset, None, data, limit=2,
                                       split_sizes=parse_split_sizes(sizes, ("train", "validation", "test"))))
    answerer = Molmo2Answerer(cfg, model, Molmo2Tokenizer(MOLMO2_TINY_TOKENIZER))
    for row, ex in zip(rows, examples):
        prompt = user_prompt(ex["message_list"][0], np.random.default_rng(ex["metadata"]["seed"]),
                             ex["metadata"]["image_size"], FormatSettings())
        answer = answerer.ask(prompt, [ex["image"]], max_new_tokens=tasks.MAX_NEW_TOKENS[task])
        assert row["prediction"] == answer.text
        assert row["scores"] == json.loads(json.dumps(tasks.score(task, answer.text, ex["metadata"])))


def test_molmo2_answers_are_scored_in_their_own_format():
    """Molmo2's <points coords> answers score as the same points written in Molmo's percent tags."""
    from molmo_jax.metrics import tasks

    truth = dict(points=[[40.0, 30.0], [320.0, 240.0]], image_width=640, image_height=480, count=2)
    molmo2 = '<points coords="1 1 063 063 2 500 500" alt="boats">boats</points>'
    molmo = '<points x1="6.3" y1="6.3" x2="50.0" y2="50.0" alt="boats">boats</points>'
    assert tasks.score("pointing", molmo2, truth) == tasks.score("pointing", molmo, truth)
    assert tasks.score("pointing", molmo2, truth)["f1"] == 1.0
    assert tasks.score("pointing", f"I see {molmo2}", truth)["valid_format"] is False  # not one element alone
    assert tasks.score("counting", molmo2, truth)["pred_count"] == 2  # points only: distinct objects
    assert tasks.score("counting", f"Counting the {molmo2} shows a total of 3.", truth)["pred_count"] == 3
    assert tasks.score("counting", '<points coords="1 1 063 063 2 500 500;2 1 070 070">b</points>',
                       truth)["pred_count"] == 2  # an object pointed at twice counts once


def test_training_batches_carry_the_pictures(tmp_path):
    """The trainer's global batch keeps Molmo2's image arrays, so the loss it trains on sees the pictures."""
    import input_pipeline
    from molmo_jax import losses
    from molmo_jax import trainer as trainer_lib
    from molmo_jax.recipe import load_recipe

    import os

    config = load_recipe(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      "configs", "molmo2_tiny_sft.py"))
    config.update(batch_size=2, seq_len=320)
    config.data.update(synthetic_split_sizes="train=8,validation=4,test=4", data_dir=str(tmp_path / "data"))
    batch = next(input_pipeline.make_train_iterator(config, 0, 1))
    trainer = trainer_lib.Trainer(config, str(tmp_path / "run"))
    gbatch = trainer._global_batch(batch)
    assert {"pixel_values", "image_token_pooling", "mm_token_type_ids"} <= set(gbatch)
    import jax
    from flax import nnx

    graphdef, state = nnx.split(trainer.model())
    grads = jax.grad(lambda st: losses.training_loss(nnx.merge(graphdef, st), gbatch)[0])(state)
    # Without the pictures the vision tower would get exactly zero gradient.
    for part in ("vision", "connector"):
        assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[part])) > 0, part
