"""Molmo2 weights and configs (molmo_jax.weights.mappings.molmo2) against transformers itself:
save_pretrained -> import -> export -> from_pretrained, both config.json forms, refusals."""
import json

import numpy as np
import pytest
import torch  # test-only dependencies: molmo_jax itself never imports them
import transformers

from molmo_jax import weights
from molmo_jax.weights import WeightsError
from molmo_jax.weights.mappings import molmo2 as molmo2_mapping
from molmo_jax.weights.params import model_to_flat
from molmo_jax.weights.stream_orbax import ParamReader
from test_hf_parity import randomise
from test_molmo2_model import tiny_config
from tools import convert


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random transformers Molmo2 (OLMo-style decoder, YaRN on some layers) and its save_pretrained directory."""
    cfg = tiny_config("rope")
    cfg.llm.update(qk_norm_type="olmo", norm_after=True, qkv_bias=True)
    hf_cfg = transformers.Molmo2Config(**molmo2_mapping.to_released(cfg, "float32"))
    hf = randomise(transformers.Molmo2ForConditionalGeneration(hf_cfg), 5).eval()
    path = tmp_path_factory.mktemp("molmo2_hf")
    hf.save_pretrained(path)
    return hf, path


def test_save_pretrained_directory_is_read_whatever_the_embedding_split(saved):
    """save_pretrained halves the token table (embedding + new_embedding rows); the released files
    split it at vocab_size. Both are one table to us."""
    from safetensors import safe_open

    hf, path = saved
    with safe_open(str(path / "model.safetensors"), "np") as f:
        first = f.get_slice(molmo2_mapping.EMBEDDING).get_shape()[0]
    cfg, model = weights.load(path)
    assert first != cfg.llm.vocab_size  # the split point really differs from the released one
    table = hf.model.language_model.embed_tokens.weight.detach().numpy()
    flat = model_to_flat(model)
    np.testing.assert_array_equal(flat[("llm", "embedding")], table[:cfg.llm.vocab_size])
    np.testing.assert_array_equal(flat[("llm", "new_embedding")], table[cfg.llm.vocab_size:])
    assert cfg.family == "molmo2" and cfg.llm.qkv_bias and cfg.llm.rope_scaling_layers == (1,)


def test_import_export_from_pretrained_and_back_bit_identical(saved, tmp_path):
    hf, path = saved
    convert.main(["import", str(path), str(tmp_path / "ours"), "--no-progress"])
    direct, imported = (model_to_flat(weights.load(p)[1]) for p in (path, tmp_path / "ours"))
    assert direct.keys() == imported.keys() and all(np.array_equal(direct[k], imported[k]) for k in direct)
    convert.main(["export", str(tmp_path / "ours"), str(tmp_path / "hf"), "--shard-size", "100KB", "--no-progress"])
    out = tmp_path / "hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "molmo2" and "auto_map" not in config and not list(out.glob("*.py"))
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"):
        assert json.loads((out / name).read_text())["processor_class"] == "Molmo2Processor", name

    back, info = transformers.Molmo2ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    theirs, ours = hf.state_dict(), back.state_dict()
    assert theirs.keys() == ours.keys()
    for key in theirs:
        assert torch.equal(theirs[key], ours[key]), key

    convert.main(["import", str(out), str(tmp_path / "again"), "--no-progress"])
    first, second = ParamReader(tmp_path / "ours" / "params"), ParamReader(tmp_path / "again" / "params")
    assert first.leaves.keys() == second.leaves.keys()
    for p in first.leaves:
        np.testing.assert_array_equal(first.read(p), second.read(p))
    assert (json.loads((tmp_path / "ours" / "config.json").read_text())
            == json.loads((tmp_path / "again" / "config.json").read_text()))


RELEASED_FORM = {  # laid out as the released (remote-code) config.json files, with the molmo2_8b preset's numbers
    "model_type": "molmo2", "architectures": ["Molmo2ForConditionalGeneration"],
    "image_start_token_id": 151936, "low_res_image_start_token_id": 151940, "image_end_token_id": 151937,
    "image_patch_id": 151938, "frame_start_token_id": 151943, "frame_end_token_id": 151944,
    "text_config": {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                    "vocab_size": 151936, "additional_vocab_size": 128, "qkv_bias": False, "num_hidden_layers": 36,
                    "intermediate_size": 12288, "hidden_act": "silu", "max_position_embeddings": 36864,
                    "rope_theta": 1000000.0, "rope_scaling": None, "rope_scaling_layers": None,
                    "use_qk_norm": True, "qk_norm_type": "qwen3", "layer_norm_eps": 1e-6, "norm_after": False},
    "vit_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                   "num_key_value_heads": 16, "head_dim": 72, "hidden_act": "gelu_pytorch_tanh",
                   "layer_norm_eps": 1e-6, "image_default_input_size": [378, 378], "image_patch_size": 14,
                   "image_num_pos": 729},
    "adapter_config": {"vit_layers": [-3, -9], "hidden_size": 1152, "num_attention_heads": 16,
                       "num_key_value_heads": 16, "head_dim": 72, "hidden_act": "silu", "intermediate_size": 12288,
                       "text_hidden_size": 4096},
}


def test_both_config_forms_read_as_transformers_reads_them(tmp_path):
    """The released form (27-layer tower cut to the 25 stored, features 24 and 18) and transformers 5's
    form give the molmo2_8b preset's numbers, and transformers parses the same dicts to the same."""
    from molmo_jax import config as config_lib

    preset = config_lib.get_config("molmo2_8b")
    released = molmo2_mapping.config_from_hf(RELEASED_FORM)
    hf = transformers.Molmo2Config(**RELEASED_FORM)
    written = molmo2_mapping.config_from_hf({k: v for k, v in hf.to_dict().items()})
    for cfg in (released, written):
        for part in ("vit", "connector", "llm", "tokens"):
            got = {k: v for k, v in cfg[part].to_dict().items() if k not in ("bos_token_id", "eos_token_id")}
            want = {k: v for k, v in preset[part].to_dict().items() if k not in ("bos_token_id", "eos_token_id")}
            assert got == want, part
    assert released.vit.n_layers == hf.vision_config.num_hidden_layers == 25
    assert list(released.vit.vit_layers) == hf.adapter_config.vision_feature_layer == [24, 18]


@pytest.mark.parametrize("where,value,message", [
    ("text_config.qk_norm_type", "gemma", "text_config.qk_norm_type='gemma' is not supported"),
    ("text_config.rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
     "text_config.rope_parameters.rope_type='dynamic' is not supported"),
    ("tie_word_embeddings", True, "tie_word_embeddings=True is not supported"),
    ("vision_config.hidden_act", "relu", "vision_config.hidden_act='relu' is not supported"),
    ("adapter_config.mlp_bias", True, "adapter_config.mlp_bias=True is not supported"),
    ("vision_config.num_position_embeddings", 5, "vision_config.num_position_embeddings=5 is not supported"),
])
def test_unsupported_fields_name_the_field(where, value, message):
    d = molmo2_mapping.to_released(tiny_config("qwen3"), "float32")
    *parents, last = where.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[last] = value
    with pytest.raises(WeightsError, match=message.replace("(", r"\(").replace("[", r"\[")):
        molmo2_mapping.config_from_hf(d)
