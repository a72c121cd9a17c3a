"""Base-model mappings (molmo_jax.weights.mappings.clip / hf_llm) against `transformers` itself, float32 on CPU.

Tiny random HF models are built here (no hub access); their weights are randomised well away from
the HF init (norm weights != 1, router logits spread out) so that a swapped or misplaced tensor
changes the outputs by far more than the 1e-4 tolerance.
"""
import math

import numpy as np
import pytest
import torch  # test-only dependencies: molmo_jax itself never imports them
import transformers

from molmo_jax import config as config_lib
from molmo_jax.weights.mappings import clip as clip_mapping
from molmo_jax.weights.mappings import hf_llm as llm_mapping
from molmo_jax.models import create_model
from molmo_jax.weights.params import model_from_flat, model_to_flat, param_paths
from molmo_jax.weights import WeightsError

TOL = 1e-4
VOCAB = 300


def randomise(module, seed):
    """Redraw every parameter: weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.3), other
    vectors (biases, CLS embedding) ~ N(0, 0.3); the MoE router is scaled up so that the top-k
    choice is never a near tie."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim <= 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * noise)
            else:  # fan_in: the last axis of a Linear / stacked experts, all but the first of a conv
                fan_in = math.prod(p.shape[1:]) if p.ndim == 4 else p.shape[-1]
                p.copy_(noise / math.sqrt(fan_in) * (4.0 if name.endswith("mlp.gate.weight") else 1.0))
    return module


def numpy_state(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def saved_state(module, tmp_path):
    """The state dict exactly as `save_pretrained` writes it."""
    from safetensors.numpy import load_file

    module.save_pretrained(tmp_path)
    return load_file(str(tmp_path / "model.safetensors"))


# ------------------------------------------------------------------------------------------------
# CLIP

def tiny_clip(n_layers=4):
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                                        num_attention_heads=4, image_size=56, patch_size=14,
                                        hidden_act="quick_gelu", attn_implementation="eager")
    model = transformers.CLIPVisionModel(cfg)
    return randomise(model, 1).eval()


def molmo_cfg_with_vit(vit_values):
    cfg = config_lib.tiny()
    cfg.vit = config_lib.vit_config(**vit_values, vit_layers=(-1, -2))
    return cfg


def patchify(pixels, patch):
    """[N, 3, H, W] -> [N, (H/p)*(W/p), p*p*3], patch rows in raster order, (dy, dx, rgb) inside."""
    n, c, h, w = pixels.shape
    x = pixels.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 3, 5, 1).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def test_clip_vision_tower_matches_transformers(tmp_path):
    hf = tiny_clip(n_layers=4)
    vit_values = clip_mapping.vit_config_from_clip(hf.config.to_dict())
    assert vit_values["n_layers"] == 3  # all but the last, as Molmo keeps 23 of 24
    cfg = molmo_cfg_with_vit(vit_values)
    mapped = clip_mapping.from_state(saved_state(hf, tmp_path), cfg)
    expected = {p: s for p, s in param_paths(cfg).items() if p[0] == "vision"}
    assert {p: a.shape for p, a in mapped.items()} == expected

    flat = model_to_flat(create_model(cfg))
    flat.update(mapped)
    model = model_from_flat(cfg, flat)

    pixels = np.random.default_rng(0).normal(size=(2, 3, 56, 56)).astype(np.float32)
    with torch.no_grad():
        hf_hidden = hf(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states
    patches = patchify(pixels, 14)
    embedded = np.asarray(model.vision.embed(patches))
    np.testing.assert_allclose(embedded, hf_hidden[0].numpy(), atol=TOL, rtol=0)
    _, ours = model.vision(patches, return_all_layers=True)
    assert ours.shape[0] == 3
    for i in range(3):  # HF hidden_states[i + 1] is the output of layer i
        diff = np.abs(np.asarray(ours[i]) - hf_hidden[i + 1].numpy()).max()
        assert diff <= TOL, f"ViT layer {i}: max abs diff {diff}"


def test_full_clip_model_keys_are_accepted():
    """A CLIPModel's `vision_model.` keys map to the same arrays; its text half is dropped."""
    config = transformers.CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=56, patch_size=14),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=99),
        projection_dim=16)
    clip = randomise(transformers.CLIPModel(config), 2)
    vit_values = clip_mapping.vit_config_from_clip(config.to_dict(), n_layers_kept=2)
    cfg = molmo_cfg_with_vit(vit_values)
    state = numpy_state(clip)
    assert any(k.startswith("vision_model.") for k in state) and any(k.startswith("text_model.") for k in state)
    from_full = clip_mapping.from_state(state, cfg)
    from_tower = clip_mapping.from_state(numpy_state(clip.vision_model), cfg)
    assert from_full.keys() == from_tower.keys()
    for path in from_full:
        np.testing.assert_array_equal(from_full[path], from_tower[path])
    assert from_full[("vision", "blocks", "w1", "bias")].shape[0] == 2  # layer 2 of 3 dropped
    np.testing.assert_array_equal(from_full[("vision", "blocks", "w1", "bias")][1],
                                  state["vision_model.encoder.layers.1.mlp.fc1.bias"])


def test_clip_config_errors():
    d = tiny_clip(n_layers=2).config.to_dict()
    with pytest.raises(WeightsError, match="cannot keep 3 of its 2 layers"):
        clip_mapping.vit_config_from_clip(d, n_layers_kept=3)
    with pytest.raises(WeightsError, match="hidden_act='relu'"):
        clip_mapping.vit_config_from_clip({**d, "hidden_act": "relu"})


def test_clip_key_errors():
    hf = tiny_clip(n_layers=2)
    cfg = molmo_cfg_with_vit(clip_mapping.vit_config_from_clip(hf.config.to_dict()))
    state = numpy_state(hf)
    missing = dict(state)
    del missing["encoder.layers.0.mlp.fc1.bias"]
    with pytest.raises(WeightsError,
                       match=r"missing keys.*'encoder\.layers\.0\.mlp\.fc1\.bias' \(64,\)"):
        clip_mapping.from_state(missing, cfg)
    bad = {**state, "embeddings.patch_embedding.weight": np.zeros((32, 3, 16, 16), np.float32)}
    with pytest.raises(WeightsError, match=r"'embeddings\.patch_embedding\.weight' has shape \(32, 3, 16, 16\) "
                                           r"but the config expects \(32, 3, 14, 14\)"):
        clip_mapping.from_state(bad, cfg)
    extra = {**state, "embeddings.patch_embedding.bias": np.zeros((32,), np.float32)}
    with pytest.raises(WeightsError, match=r"unexpected keys.*'embeddings\.patch_embedding\.bias' \(32,\)"):
        clip_mapping.from_state(extra, cfg)


# ------------------------------------------------------------------------------------------------
# LLMs

def tiny_llm(kind, tie=False):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, eos_token_id=7, attn_implementation="eager",
                  rope_parameters={"rope_type": "default", "rope_theta": 50_000.0})
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**common, intermediate_size=96, num_hidden_layers=2))
    elif kind == "olmo2":
        model = transformers.Olmo2ForCausalLM(
            transformers.Olmo2Config(**common, intermediate_size=96, num_hidden_layers=3))
    else:
        model = transformers.OlmoeForCausalLM(
            transformers.OlmoeConfig(**common, intermediate_size=32, num_hidden_layers=2, num_experts=8,
                                     num_experts_per_tok=3))
    return randomise(model, 3).eval()


def molmo_cfg_with_llm(llm_values, **overrides):
    cfg = config_lib.tiny()
    cfg.llm = config_lib.llm_config(**llm_values, additional_vocab_size=8, max_sequence_length=1024)
    cfg.llm.update(overrides)
    return cfg


def token_batch():
    """Two rows of random ids, the second right-padded after 7 tokens."""
    ids = np.random.default_rng(4).integers(0, VOCAB, size=(2, 12))
    valid = np.ones_like(ids, dtype=bool)
    valid[1, 7:] = False
    return ids, valid


def hf_logits(hf, ids, valid):
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(np.where(valid, ids, 0)),
                 attention_mask=torch.from_numpy(valid.astype(np.int64)))
    return out.logits.numpy()


def molmo_logits(cfg, mapped, ids, valid):
    flat = model_to_flat(create_model(cfg))  # ViT, connector and new_embedding: random init
    flat.update(mapped)
    model = model_from_flat(cfg, flat)
    return np.asarray(model(np.where(valid, ids, -1))["logits"])


def max_diff_on_valid(a, b, valid):
    return float(np.abs(a - b)[valid].max())


@pytest.mark.parametrize("kind, overrides", [
    ("qwen2", {}), ("olmo2", {}),
    ("olmoe", {"moe_impl": "ragged"}), ("olmoe", {"moe_impl": "dense"}),
])
def test_llm_logits_match_transformers(kind, overrides, tmp_path):
    hf = tiny_llm(kind)
    values = llm_mapping.llm_config_from_hf(hf.config.to_dict())
    assert values["rope_theta"] == 50_000.0 and values["eos_token_id"] == 7
    cfg = molmo_cfg_with_llm(values, **overrides)
    mapped = llm_mapping.from_state(saved_state(hf, tmp_path), cfg)
    expected = {p: s for p, s in param_paths(cfg).items() if p[0] == "llm" and p != ("llm", "new_embedding")}
    assert {p: a.shape for p, a in mapped.items()} == expected

    ids, valid = token_batch()
    want = hf_logits(hf, ids, valid)
    got = molmo_logits(cfg, mapped, ids, valid)
    assert got.shape == want.shape
    assert max_diff_on_valid(got, want, valid) <= TOL
    assert np.abs(want[valid]).max() > 0.5  # logits are not near zero, so the tolerance means something
    if kind == "olmoe":
        assert router_margin(hf, ids, valid) > 1e-2  # no near tie in top-k: parity is not luck


def router_margin(hf, ids, valid):
    """Smallest gap between the k-th and (k+1)-th router logit over valid tokens and layers."""
    k = hf.config.num_experts_per_tok
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(np.where(valid, ids, 0)),
                 attention_mask=torch.from_numpy(valid.astype(np.int64)), output_router_logits=True)
    gaps = []
    for logits in out.router_logits:
        top = logits.reshape(*ids.shape, -1)[torch.from_numpy(valid)].sort(-1, descending=True).values
        gaps.append(float((top[:, k - 1] - top[:, k]).min()))
    return min(gaps)


def test_swapped_up_and_gate_would_be_caught(tmp_path):
    """Negative control for the parity test: the classic mistake (gate and up exchanged) moves the
    logits by far more than the tolerance."""
    hf = tiny_llm("qwen2")
    cfg = molmo_cfg_with_llm(llm_mapping.llm_config_from_hf(hf.config.to_dict()))
    mapped = llm_mapping.from_state(numpy_state(hf), cfg)
    up, gate = ("llm", "blocks", "ffn", "w_up", "kernel"), ("llm", "blocks", "ffn", "w_gate", "kernel")
    mapped[up], mapped[gate] = mapped[gate], mapped[up]
    ids, valid = token_batch()
    assert max_diff_on_valid(molmo_logits(cfg, mapped, ids, valid), hf_logits(hf, ids, valid), valid) > 100 * TOL


def test_olmoe_fused_in_memory_experts_equal_saved_per_expert_keys(tmp_path):
    """transformers 5 keeps experts fused (`experts.gate_up_proj`) in memory but writes one Linear per
    expert to disk: both forms give the same arrays."""
    hf = tiny_llm("olmoe")
    cfg = molmo_cfg_with_llm(llm_mapping.llm_config_from_hf(hf.config.to_dict()))
    in_memory, on_disk = numpy_state(hf), saved_state(hf, tmp_path)
    assert "model.layers.0.mlp.experts.gate_up_proj" in in_memory
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in on_disk
    a, b = llm_mapping.from_state(in_memory, cfg), llm_mapping.from_state(on_disk, cfg)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=".".join(path))


def test_tied_embeddings_are_copied(tmp_path):
    hf = tiny_llm("qwen2", tie=True)
    state = saved_state(hf, tmp_path)
    assert "lm_head.weight" not in state  # save_pretrained drops the tied head
    cfg = molmo_cfg_with_llm(llm_mapping.llm_config_from_hf(hf.config.to_dict()))
    with pytest.raises(WeightsError, match="missing keys.*'lm_head.weight'"):
        llm_mapping.from_state(state, cfg)
    mapped = llm_mapping.from_state(state, cfg, tie_word_embeddings=True)
    np.testing.assert_array_equal(mapped[("llm", "ff_out", "kernel")], state["model.embed_tokens.weight"].T)


def test_llm_key_errors():
    hf = tiny_llm("olmo2")
    state = numpy_state(hf)
    cfg = molmo_cfg_with_llm(llm_mapping.llm_config_from_hf(hf.config.to_dict()))
    missing = {k: v for k, v in state.items() if k != "model.layers.2.self_attn.k_norm.weight"}
    with pytest.raises(WeightsError, match=r"missing keys.*'model\.layers\.2\.self_attn\.k_norm\.weight' "
                                           r"\(32,\)"):
        llm_mapping.from_state(missing, cfg)
    bad = {**state, "model.layers.1.mlp.up_proj.weight": np.zeros((64, 96), np.float32)}
    with pytest.raises(WeightsError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(64, 96\) "
                                           r"but the config expects \(96, 64\)"):
        llm_mapping.from_state(bad, cfg)
    extra = {**state, "model.layers.0.input_layernorm.weight": np.ones((64,), np.float32)}
    with pytest.raises(WeightsError, match=r"unexpected keys.*'model\.layers\.0\.input_layernorm\.weight'"):
        llm_mapping.from_state(extra, cfg)  # OLMo-2 has no input norms: a Qwen2 layout is refused
    wrong_vocab = molmo_cfg_with_llm({**llm_mapping.llm_config_from_hf(hf.config.to_dict()), "embedding_size": 320})
    with pytest.raises(WeightsError, match=r"'model\.embed_tokens\.weight' has shape \(300, 64\)"):
        llm_mapping.from_state(state, wrong_vocab)


@pytest.mark.parametrize("kind, change, message", [
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_parameters of type 'yarn'"),
    ("qwen2", {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling of type 'linear'"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1, "layer_types": None},
     "use_sliding_window=True"),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types="),
    ("qwen2", {"model_type": "llama"}, "model_type='llama' is not supported"),
    ("qwen2", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
    ("olmoe", {"norm_topk_prob": True}, "norm_topk_prob=True"),
    ("olmo2", {"attention_bias": True}, "attention_bias=True"),
])
def test_unsupported_llm_configs_are_refused(kind, change, message):
    d = {**tiny_llm(kind).config.to_dict(), **change}
    with pytest.raises(WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        llm_mapping.llm_config_from_hf(d)


def test_qwen2_sliding_window_switched_off_is_accepted():
    """Real Qwen2 configs carry sliding_window / max_window_layers with use_sliding_window false."""
    d = {**tiny_llm("qwen2").config.to_dict(), "use_sliding_window": False, "sliding_window": 131072,
         "max_window_layers": 1}
    assert llm_mapping.llm_config_from_hf(d)["qkv_bias"] is True


# Public config.json values of the base models the released Molmos start from (docs/architecture.md#presets).
QWEN2_7B = dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, rms_norm_eps=1e-6,
                rope_theta=1_000_000.0, rope_scaling=None, use_sliding_window=False, sliding_window=131072,
                max_window_layers=28, hidden_act="silu", tie_word_embeddings=False, eos_token_id=151643)
OLMO_7B_1024 = dict(model_type="olmo2", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, intermediate_size=11008, vocab_size=100352, rms_norm_eps=1e-6,
                    rope_theta=500_000.0, rope_scaling=None, attention_bias=False, hidden_act="silu",
                    eos_token_id=100257)
OLMOE_1B_7B = dict(model_type="olmoe", hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                   num_key_value_heads=16, intermediate_size=1024, vocab_size=50304, rms_norm_eps=1e-5,
                   rope_theta=10_000.0, rope_scaling=None, clip_qkv=None, num_experts=64,
                   num_experts_per_tok=8, norm_topk_prob=False, hidden_act="silu", eos_token_id=50279)
CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5)


@pytest.mark.parametrize("hf_config, preset, own_vocab", [
    (QWEN2_7B, "molmo_7b_d", False), (OLMO_7B_1024, "molmo_7b_o", True), (OLMOE_1B_7B, "molmoe_1b", True),
])
def test_released_base_configs_give_the_preset_llms(hf_config, preset, own_vocab):
    """The base LLM configs map onto the released presets' decoders; only vocab_size (the Molmo
    tokenizer's size, when smaller than the embedding) is the caller's to lower."""
    values = llm_mapping.llm_config_from_hf(hf_config)
    want = config_lib.get_config(preset).llm
    differing = {k: (v, want[k]) for k, v in values.items() if want[k] != v}
    assert differing == ({"vocab_size": (hf_config["vocab_size"], want.vocab_size)} if own_vocab else {})


def test_clip_l_336_gives_the_molmo_vit():
    values = clip_mapping.vit_config_from_clip(CLIP_L_336)
    want = config_lib.vit_config()
    assert values == {k: want[k] for k in values} and values["n_layers"] == 23
