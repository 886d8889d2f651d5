"""Checkpoint I/O: round trips, config traps, error messages, atomic writes, memory, the convert verb."""

from __future__ import annotations

import gc
import json
import textwrap
from pathlib import Path

import pytest
import torch

from tianying.checkpoint import (
    CheckpointError,
    convert,
    default_dtype,
    detect_format,
    expected_shapes,
    load_config,
    load_model,
    load_state_dict,
    parse_dtype,
    parse_size,
    save_flagai,
    save_hf,
)
from tianying.config import Config, ConfigError
from tianying.errors import TianyingError
from tianying.model import build_model


def _model(cfg_name="test-gqa", seed=0, **kw):
    cfg = Config.from_name(cfg_name, **kw)
    return build_model(cfg, seed=seed), cfg


def _sd_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), k


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("cfg_name", ["test-mha", "test-gqa"])
def test_save_flagai_round_trip(tmp_path, cfg_name):
    model, cfg = _model(cfg_name, chat_template="aquila-v1")
    out = save_flagai(model, cfg, tmp_path / "native")
    assert detect_format(out) == "flagai"
    raw = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert "layers.0.attention.wq.weight" in raw and "model.embed_tokens.weight" not in raw
    # q rows really are permuted on disk (interleaved), v rows are not
    hf_q = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(raw["layers.0.attention.wq.weight"], hf_q)
    assert torch.equal(raw["layers.0.attention.wv.weight"], model.model.layers[0].self_attn.v_proj.weight)
    back, cfg2 = load_model(out)
    _sd_equal(back.state_dict(), model.state_dict())
    assert (cfg2.n_kv_head, cfg2.intermediate_size, cfg2.chat_template) == (cfg.n_kv_head, 176, "aquila-v1")


def test_save_flagai_keeps_rope_scaling(tmp_path):
    model, cfg = _model("test-mha", rope_scaling={"type": "linear", "factor": 4}, rope_theta=1e6)
    with pytest.warns(UserWarning, match="rope"):
        out = save_flagai(model, cfg, tmp_path / "native")
    cfg2 = load_config(out)
    assert cfg2.rope_theta == 1e6 and cfg2.rope_scaling["factor"] == 4.0


def test_save_hf_round_trip_and_files(tmp_path):
    model, cfg = _model("test-gqa", chat_template="aquila-v2")
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        (tok / name).write_text(f"{name} contents")
    (tok / "unrelated.txt").write_text("not copied")
    out = save_hf(model, cfg, tmp_path / "hf", tokenizer_dir=tok)
    assert detect_format(out) == "hf"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "generation_config.json", "merges.txt", "model.safetensors",
                     "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert (out / "merges.txt").read_text() == "merges.txt contents"
    conf = json.loads((out / "config.json").read_text())
    assert conf["tianying_chat_template"] == "aquila-v2" and conf["model_type"] == "llama"
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                        "pad_token_id": 0}
    back, cfg2 = load_model(out)
    _sd_equal(back.state_dict(), model.state_dict())
    assert cfg2.chat_template == "aquila-v2"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_save_hf_sharding(tmp_path):
    model, cfg = _model("test-mha")
    out = save_hf(model, cfg, tmp_path / "hf", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    assert set(index["weight_map"]) == set(model.state_dict())
    for shard in shards[:-1]:  # every shard under the limit unless one tensor alone exceeds it
        assert (out / shard).stat().st_size < 40_000 + 64 * 1024 or shard == shards[0]
    _sd_equal(load_state_dict(out), model.state_dict())


def test_load_dtype_and_save_dtype(tmp_path):
    model, cfg = _model("test-mha")
    out = save_hf(model, cfg, tmp_path / "hf", dtype="bf16")
    assert load_config(out).torch_dtype == "bfloat16"
    sd = load_state_dict(out)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    m16, _ = load_model(out, dtype=torch.float16)
    assert {p.dtype for p in m16.parameters()} == {torch.float16}
    m32, _ = load_model(out)
    assert {p.dtype for p in m32.parameters()} == {torch.float32}
    torch.testing.assert_close(m32.lm_head.weight, model.lm_head.weight.bfloat16().float(), atol=0, rtol=0)


@pytest.mark.parametrize("cfg_name", ["test-mha", "test-gqa"])
def test_expected_shapes_match_the_model(cfg_name):
    cfg = Config.from_name(cfg_name)
    model = build_model(cfg, init=False)
    assert list(expected_shapes(cfg).items()) == [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_default_dtype():
    sd = {"a": torch.zeros(10, dtype=torch.bfloat16), "b": torch.zeros(2), "i": torch.zeros(50, dtype=torch.long)}
    assert default_dtype(sd, "cpu") is torch.float32  # CPU: fp32 whatever the file holds
    assert default_dtype(sd, "cuda") is torch.bfloat16  # elsewhere: what most of the weights are stored in


def test_legacy_bin_serialization(tmp_path):
    """Pre-zip torch.save files cannot be memory-mapped; they are still read, still weights-only."""
    model, cfg = _model("test-mha")
    out = save_flagai(model, cfg, tmp_path / "native")
    native = torch.load(out / "pytorch_model.bin", weights_only=True)
    torch.save(native, out / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    back, _ = load_model(out)
    _sd_equal(back.state_dict(), model.state_dict())


def test_parse_helpers():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    assert parse_dtype("fp32") is torch.float32 and parse_dtype(None) is None
    assert parse_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(CheckpointError, match="unknown dtype"):
        parse_dtype("int3")
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30 and parse_size(123) == 123 and parse_size("10kb") == 10_000
    for bad in ("lots", "-1", 0):
        with pytest.raises(CheckpointError):
            parse_size(bad)


# ---------------------------------------------------------------------- config traps
def _write_config(path: Path, text: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(textwrap.dedent(text))
    return path


def test_v1_placeholder_special_ids(tmp_path):
    path = _write_config(tmp_path / "v1", """\
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100008,
         "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
         "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}""")
    with pytest.warns(UserWarning, match="placeholder"):
        cfg = load_config(path)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (100006, 100007)


def test_duplicate_rope_scaling_is_an_error(tmp_path):
    path = _write_config(tmp_path / "dup", """\
        {"model_type": "aquila", "vocab_size": 100008, "hidden_size": 64, "intermediate_size": 176,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "rope_scaling": {"type": "linear", "factor": 4.0},
         "rope_scaling": null}""")
    with pytest.raises((CheckpointError, ConfigError), match="rope_scaling") as e:
        load_config(path)
    assert "config.json" in str(e.value)


def test_native_config_fields(tmp_path):
    path = _write_config(tmp_path / "native", """\
        {"dim": 4096, "n_heads": 32, "n_layers": 32, "multiple_of": 256, "norm_eps": 1e-5,
         "vocab_size": 100008, "max_seq_len": 2048, "flash_atten": false}""")
    cfg = load_config(path)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.n_kv_head) == (4096, 11008, 32)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.rope_scaling) == (100006, 100007, None)


def test_transformers5_rope_parameters(tmp_path):
    path = _write_config(tmp_path / "t5", """\
        {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
         "num_hidden_layers": 2, "num_attention_heads": 4,
         "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "linear", "factor": 8.0}}""")
    cfg = load_config(path)
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling["factor"] == 8.0
    assert "rope_parameters" not in cfg.to_hf()


# ---------------------------------------------------------------------- errors: one clear line
@pytest.fixture
def hf_dir(tmp_path):
    model, cfg = _model("test-gqa")
    return save_hf(model, cfg, tmp_path / "hf"), model, cfg


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, TianyingError)
    return msg


def test_corrupt_safetensors(hf_dir):
    path, _, _ = hf_dir
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert "model.safetensors" in _one_line(e) and "safetensors" in str(e.value)


def test_truncated_safetensors(hf_dir):
    path, _, _ = hf_dir
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert "model.safetensors" in _one_line(e)


def test_corrupt_bin(tmp_path):
    model, cfg = _model("test-mha")
    out = save_flagai(model, cfg, tmp_path / "native")
    data = (out / "pytorch_model.bin").read_bytes()
    (out / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError) as e:
        load_model(out)
    assert "pytorch_model.bin" in _one_line(e)


def test_bin_with_code_is_refused(tmp_path):
    """A pickle that would call a function on load is rejected (weights_only=True), never executed."""
    model, cfg = _model("test-mha")
    out = save_flagai(model, cfg, tmp_path / "native")
    marker = tmp_path / "pwned"
    payload = {"module": model.state_dict(), "evil": _Evil(str(marker))}
    torch.save(payload, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(out)
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_missing_shard(tmp_path):
    model, cfg = _model("test-mha")
    out = save_hf(model, cfg, tmp_path / "hf", max_shard_size="40KB")
    (out / "model-00002-of-{:05d}.safetensors".format(len(list(out.glob("model-*"))))).unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(out)
    assert "model-00002-of-" in _one_line(e) and "missing" in str(e.value)


def test_shape_mismatch(hf_dir):
    path, _, _ = hf_dir
    conf = json.loads((path / "config.json").read_text())
    conf["num_key_value_heads"] = 4  # weights were written for 2 KV heads
    (path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = _one_line(e)
    assert "k_proj.weight" in msg and "(64, 64)" in msg and "(32, 64)" in msg


def test_unknown_and_missing_keys(tmp_path):
    model, cfg = _model("test-mha")
    sd = dict(model.state_dict())
    with pytest.raises(CheckpointError, match="unexpected tensor model.extra.weight"):
        save_hf({**sd, "model.extra.weight": torch.zeros(2)}, cfg, tmp_path / "a")
    sd.pop("model.norm.weight")
    with pytest.raises(CheckpointError, match="lacks model.norm.weight"):
        save_hf(sd, cfg, tmp_path / "b")
    # the same checks apply when reading
    out = save_hf(model, cfg, tmp_path / "c")
    from safetensors.torch import save_file

    full = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({**full, "model.bogus": torch.zeros(3)}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor model.bogus in model.safetensors"):
        load_model(out)


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    _write_config(tmp_path / "empty", json.dumps(Config.from_name("test-mha").to_hf()))
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path / "empty")


# ---------------------------------------------------------------------- atomic writes
def test_failed_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    import tianying.checkpoint as ck

    model, cfg = _model("test-mha")
    out = save_hf(model, cfg, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_json", boom)
    other, _ = _model("test-mha", seed=1)
    with pytest.raises(OSError, match="disk full"):
        save_hf(other, cfg, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_overwrite_replaces_checkpoint_but_not_other_dirs(tmp_path):
    model, cfg = _model("test-mha")
    out = save_hf(model, cfg, tmp_path / "hf", max_shard_size="40KB")
    save_hf(model, cfg, out)  # replaces: the old shards must not linger
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    with pytest.raises(CheckpointError, match="refusing"):
        save_hf(model, cfg, precious)
    assert (precious / "thesis.tex").exists()


def test_save_over_the_checkpoint_being_read(tmp_path):
    """Loaded parameters are views of the files; writing over their directory must not corrupt them."""
    model, cfg = _model("test-gqa")
    out = save_hf(model, cfg, tmp_path / "hf")
    loaded, _ = load_model(out)
    save_hf(loaded, cfg, out, dtype="bf16")
    _sd_equal(loaded.state_dict(), model.state_dict())  # still the old fp32 values, readable
    assert {t.dtype for t in load_state_dict(out).values()} == {torch.bfloat16}
    convert(out, out, to="flagai")  # in place, across layouts
    assert detect_format(out) == "flagai"
    _sd_equal(load_state_dict(out), {k: v.bfloat16() for k, v in model.state_dict().items()})


# ---------------------------------------------------------------------- memory
def _mapped_files() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi, parts[5].strip()))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("layout", ["hf", "flagai-mha"])
def test_parameters_are_the_mapped_file(tmp_path, layout):
    """Same-dtype loads do not copy: every parameter (except permuted native q/k) lives in the file mapping."""
    model, cfg = _model("test-mha")
    out = (save_hf if layout == "hf" else save_flagai)(model, cfg, tmp_path / "ckpt")
    loaded, _ = load_model(out)
    maps = _mapped_files()
    for name, p in loaded.named_parameters():
        ptr = p.data_ptr()
        backing = next((m[2] for m in maps if m[0] <= ptr < m[1]), "")
        permuted = layout != "hf" and ("q_proj" in name or "k_proj" in name)
        assert (str(out.resolve()) in backing) != permuted, (name, backing)


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_about_one_file(tmp_path):
    """Loading ~20 MB of fp32 weights raises peak RSS by ~1× the file; a copying loader peaks near 2×."""
    cfg = Config.from_name("test-mha", vocab_size=16000, hidden_size=128, intermediate_size=352, n_layer=4)
    model = build_model(cfg, seed=0)
    out = save_hf(model, cfg, tmp_path / "hf")
    del model
    tiny, tiny_cfg = _model("test-mha")
    load_model(save_hf(tiny, tiny_cfg, tmp_path / "tiny"))  # warm-up: one-time allocations of the first load
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    base = _vm("VmHWM")
    loaded, _ = load_model(out)
    with torch.no_grad():
        touched = sum(float(p.sum()) for p in loaded.parameters())  # fault in every page
    grew_kb = _vm("VmHWM") - base
    size_kb = (out / "model.safetensors").stat().st_size / 1024
    assert touched == touched  # not NaN: the weights were really read
    assert grew_kb < 1.3 * size_kb + 2048, (grew_kb, size_kb)  # measured: 1.05× (a copying loader: 1.8×)


# ---------------------------------------------------------------------- convert + CLI
def test_convert_native_to_hf_and_back(tmp_path, token_ids):
    model, cfg = _model("test-gqa")
    native = save_flagai(model, cfg, tmp_path / "native")
    (native / "vocab.json").write_text("{}")
    hf = convert(native, tmp_path / "hf", to="hf", dtype="bf16")
    assert detect_format(hf) == "hf" and (hf / "vocab.json").exists()
    assert {t.dtype for t in load_state_dict(hf).values()} == {torch.bfloat16}
    back = convert(hf, tmp_path / "native2", to="flagai")
    m2, _ = load_model(back)
    _sd_equal(m2.state_dict(), {k: v.bfloat16().float() for k, v in model.state_dict().items()})
    with pytest.raises(CheckpointError, match="unknown target layout"):
        convert(native, tmp_path / "x", to="gguf")


def test_cli_convert(tmp_path, capsys):
    from tianying.cli import main

    model, cfg = _model("test-mha")
    src = save_hf(model, cfg, tmp_path / "src")
    rc = main(["convert", str(src), str(tmp_path / "dst"), "--to", "flagai", "--dtype", "fp16"])
    assert rc == 0, capsys.readouterr().err
    assert detect_format(tmp_path / "dst") == "flagai"
    assert {t.dtype for t in torch.load(tmp_path / "dst" / "pytorch_model.bin", weights_only=True).values()} == \
        {torch.float16}
    assert "dst" in capsys.readouterr().out
    rc = main(["convert", str(src), str(tmp_path / "sharded"), "--max-shard-size", "40KB"])
    assert rc == 0 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()


def test_cli_convert_errors(tmp_path, capsys):
    from tianying.cli import main

    capsys.readouterr()
    rc = main(["convert", str(tmp_path / "missing"), str(tmp_path / "dst")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("tianying convert: error:") and "does not exist" in err
    model, cfg = _model("test-mha")
    src = save_hf(model, cfg, tmp_path / "src")
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    rc = main(["convert", str(src), str(tmp_path / "dst")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "model.safetensors" in err
    assert not (tmp_path / "dst").exists()


def test_cli_convert_help(capsys):
    from tianying.cli import main

    with pytest.raises(SystemExit) as e:
        main(["convert", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--to", "--dtype", "--max-shard-size", "SRC", "DST"):
        assert opt in out
