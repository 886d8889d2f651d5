"""Named configs match the spec's sizes; config.json dialects and the hub's traps are handled."""

import json

import pytest

from tianying.config import CONFIGS, Config, ConfigError, ffn_width


@pytest.mark.parametrize("name,params_b", [
    ("aquila-7b", 7.296), ("aquilachat-7b", 7.296), ("aquilacode-7b-nv", 7.296), ("aquilacode-7b-ts", 7.296),
    ("aquila2-7b", 7.296), ("aquilachat2-7b", 7.296), ("aquilachat2-7b-16k", 7.296),
    ("aquila2-34b", 33.69), ("aquilachat2-34b", 33.69), ("aquilachat2-34b-16k", 33.69),
])
def test_released_sizes_match_spec(name, params_b):
    cfg = Config.from_name(name)
    assert cfg.head_dim == 128
    assert abs(cfg.n_params / 1e9 - params_b) < 0.01


def test_spec_details():
    assert Config.from_name("aquila2-34b").n_kv_head == 8
    assert Config.from_name("aquilachat2-7b-16k").rope_scaling["factor"] == 8.0
    assert Config.from_name("aquilachat2-34b-16k").rope_scaling["factor"] == 4.0
    assert Config.from_name("aquilachat2-34b-16k").max_position_embeddings == 4096
    assert Config.from_name("aquilachat2-7b").chat_template == "aquila-v1"
    assert Config.from_name("aquilachat2-34b").chat_template == "aquila-legacy"
    assert abs(Config.from_name("small").n_params / 1e6 - 239) < 1
    assert abs(Config.from_name("tiny").n_params / 1e6 - 54) < 1
    assert ffn_width(4096) == 11008 and ffn_width(6656) == 17920
    assert {"demo", "tiny", "small", "test-mha", "test-gqa"} <= set(CONFIGS)


def test_unknown_name_lists_known():
    with pytest.raises(ConfigError, match="aquila2-7b"):
        Config.from_name("aquila-9b")


def hf_json(**over):
    base = {"model_type": "aquila", "architectures": ["AquilaForCausalLM"], "vocab_size": 100008,
            "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
            "bos_token_id": 100006, "eos_token_id": 100007, "pad_token_id": 0}
    base.update(over)
    return base


def test_from_hf_aquila_and_llama(tmp_path):
    for mt in ("aquila", "llama"):
        (tmp_path / "config.json").write_text(json.dumps(hf_json(model_type=mt)))
        cfg = Config.from_hf(tmp_path)
        assert (cfg.hidden_size, cfg.n_kv_head, cfg.bos_token_id) == (4096, 32, 100006)


def test_v1_bogus_special_ids_are_replaced(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_json(bos_token_id=1, eos_token_id=2)))
    with pytest.warns(UserWarning, match="placeholder"):
        cfg = Config.from_hf(tmp_path / "config.json")
    assert (cfg.bos_token_id, cfg.eos_token_id) == (100006, 100007)


def test_duplicate_rope_scaling_is_an_error(tmp_path):
    text = json.dumps(hf_json())[:-1] + ', "rope_scaling": {"type": "linear", "factor": 4.0}, "rope_scaling": null}'
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="rope_scaling"):
        Config.from_hf(tmp_path)


def test_duplicate_model_type_warns(tmp_path):
    text = json.dumps(hf_json())[:-1] + ', "model_type": "llama"}'
    text = text.replace('"model_type": "aquila"', '"model_type": "AquilaChat"')
    (tmp_path / "config.json").write_text(text)
    with pytest.warns(UserWarning, match="model_type"):
        assert Config.from_hf(tmp_path).hidden_size == 4096


def test_flagai_native_fields():
    cfg = Config.from_hf({"dim": 4096, "n_heads": 32, "n_layers": 32, "multiple_of": 256, "norm_eps": 1e-6,
                          "vocab_size": 100008, "max_seq_len": 2048})
    assert (cfg.intermediate_size, cfg.rms_norm_eps, cfg.bos_token_id, cfg.eos_token_id) == (11008, 1e-6, 100006,
                                                                                               100007)
    again = Config.from_hf(cfg.to_flagai())
    assert again.to_hf() == cfg.to_hf()


def test_round_trip_and_rope_scaling_spellings():
    cfg = Config.from_name("aquilachat2-7b-16k")
    back = Config.from_hf(cfg.to_hf())
    assert back.rope_scaling == cfg.rope_scaling and back.chat_template == "aquila"
    assert Config.from_hf(hf_json(rope_scaling={"rope_type": "linear", "factor": 2})).rope_scaling["type"] == "linear"
    assert Config.from_hf(hf_json(rope_scaling={"rope_type": "default"})).rope_scaling is None
    with pytest.raises(ConfigError):
        Config.from_hf(hf_json(rope_scaling={"type": "weird", "factor": 2}))
    with pytest.raises(ConfigError):
        Config.from_hf(hf_json(model_type="gpt2"))
    with pytest.raises(ConfigError, match="hidden_size"):
        Config.from_hf({k: v for k, v in hf_json().items() if k != "hidden_size"})


def test_transformers5_rope_parameters_spelling():
    cfg = Config.from_hf(hf_json(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}))
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling["type"] == "linear" and cfg.rope_scaling["factor"] == 4.0
    cfg = Config.from_hf(hf_json(rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling is None
