"""init-from-base against `transformers` itself: tiny random CLIP / Qwen2 / OLMo-2 / OLMoE models saved
with save_pretrained, converted, loaded back with load_model, compared in float32 (max abs <= 1e-4)."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_parity import hf_logits, patchify, tiny_clip, tiny_llm, token_batch  # noqa: E402

from molmo_jax import weights  # noqa: E402
from molmo_jax.weights import init_from_base  # noqa: E402
from molmo_jax.weights import WeightsError  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    hf = tiny_clip(n_layers=4)
    d = tmp_path_factory.mktemp("clip")
    hf.save_pretrained(d)
    return hf, d


def saved_llm(kind, tmp_path):
    hf = tiny_llm(kind)
    hf.save_pretrained(tmp_path / kind)
    (tmp_path / kind / "tokenizer.json").write_text("{}")  # copied along as the base tokenizer
    return hf, tmp_path / kind


@pytest.mark.parametrize("kind", ["qwen2", "olmo2", "olmoe"])
def test_init_from_base_matches_transformers(tmp_path, clip_dir, kind):
    clip, vit_dir = clip_dir
    llm, llm_dir = saved_llm(kind, tmp_path)
    summary = init_from_base(vit_dir, llm_dir, tmp_path / "molmo", vit_layers=(-1, -2), seed=5,
                             additional_vocab_size=16, max_sequence_length=512)
    assert any("fresh connector" in n for n in summary.notes)
    cfg, model = weights.load(tmp_path / "molmo")
    assert cfg.vit.n_layers == 3 and cfg.llm.n_layers == llm.config.num_hidden_layers
    assert cfg.llm.moe_num_experts == (8 if kind == "olmoe" else 0)
    assert (tmp_path / "molmo" / "tokenizer" / "tokenizer.json").is_file()

    # ViT: every kept layer equals the CLIP hidden state after it.
    pixels = np.random.default_rng(0).normal(size=(2, 3, 56, 56)).astype(np.float32)
    with torch.no_grad():
        hf_hidden = clip(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states
    _, ours = model.vision(patchify(pixels, 14), return_all_layers=True)
    for i in range(3):
        assert float(np.abs(np.asarray(ours[i]) - hf_hidden[i + 1].numpy()).max()) <= TOL, f"ViT layer {i}"

    # LLM: logits on token ids (no image) equal the transformers model's on valid positions.
    ids, valid = token_batch()
    want = hf_logits(llm, ids, valid)
    got = np.asarray(model(np.where(valid, ids, -1))["logits"])
    assert got.shape == want.shape
    assert float(np.abs(got - want)[valid].max()) <= TOL
    assert np.abs(want[valid]).max() > 0.5

    # Fresh parts (docs/architecture.md#initialisation): new embedding rows N(0, 0.02), zero padding embeddings and biases.
    new = np.asarray(model.llm.new_embedding[...])
    assert new.shape == (16, cfg.llm.d_model) and 0.015 < new.std() < 0.025
    assert not np.any(np.asarray(model.connector.pad_embed[...]))
    assert not np.any(np.asarray(model.connector.wq.bias[...]))
    assert 0.015 < float(np.asarray(model.connector.w1.kernel[...]).std()) < 0.025


def test_init_from_base_is_deterministic_and_casts(tmp_path, clip_dir):
    _, vit_dir = clip_dir
    _, llm_dir = saved_llm("qwen2", tmp_path)
    init_from_base(vit_dir, llm_dir, tmp_path / "a", vit_layers=(-1,), seed=1, dtype="bfloat16")
    init_from_base(vit_dir, llm_dir, tmp_path / "b", vit_layers=(-1,), seed=1, dtype="bfloat16")
    (cfg, a), (_, b) = weights.load(tmp_path / "a"), weights.load(tmp_path / "b")
    assert cfg.param_dtype == "bfloat16" and a.llm.embedding[...].dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(np.asarray(a.connector.w2.kernel[...]), np.asarray(b.connector.w2.kernel[...]))
    np.testing.assert_array_equal(np.asarray(a.llm.new_embedding[...]), np.asarray(b.llm.new_embedding[...]))


def test_init_from_base_errors(tmp_path, clip_dir):
    from safetensors.numpy import load_file, save_file

    _, vit_dir = clip_dir
    _, llm_dir = saved_llm("olmo2", tmp_path)
    with pytest.raises(WeightsError, match="--vit-layers: vit.vit_layers entry -9 is out of range for 3"):
        init_from_base(vit_dir, llm_dir, tmp_path / "dst")
    with pytest.raises(WeightsError, match=r"--vocab-size 400 must be in 1..300"):
        init_from_base(vit_dir, llm_dir, tmp_path / "dst", vit_layers=(-1,), vocab_size=400)
    state = load_file(llm_dir / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = np.zeros((64, 96), np.float32)
    save_file(state, llm_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(64, 96\) but "
                                           r"the config expects \(96, 64\)"):
        init_from_base(vit_dir, llm_dir, tmp_path / "dst", vit_layers=(-1,))
    state["model.layers.1.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)
    state["model.layers.3.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)  # the config has 3 layers
    save_file(state, llm_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"unexpected keys for this config: 'model.layers.3.mlp.up_proj.weight'"):
        init_from_base(vit_dir, llm_dir, tmp_path / "dst", vit_layers=(-1,))
    del state["model.layers.3.mlp.up_proj.weight"]
    state["model.layers.2.mlp.up_proj.weight"][0, 0] = np.nan
    save_file(state, llm_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"'model.layers.2.mlp.up_proj.weight' \(96, 64\) has 1 NaN/Inf"):
        init_from_base(vit_dir, llm_dir, tmp_path / "dst", vit_layers=(-1,))
    assert not (tmp_path / "dst").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.")]
    config = json.loads((llm_dir / "config.json").read_text())
    (llm_dir / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(WeightsError, match="model_type='llama' is not supported"):
        init_from_base(vit_dir, llm_dir, tmp_path / "dst", vit_layers=(-1,))
