"""Bad input a user can reach gets one line, never a traceback (issue 15): invalid Unicode, devices this torch
cannot serve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tianying.tokenizer import Tokenizer

FIXTURE_TOKENIZER = Path(__file__).parent / "data" / "tokenizer"


def test_lone_surrogates_are_replaced_with_one_warning():
    tok = Tokenizer.from_dir(FIXTURE_TOKENIZER)
    with pytest.warns(UserWarning, match="invalid Unicode"):
        ids = tok.encode("北京\ud800是")  # a JSON "\ud800" escape or an undecodable argv byte looks like this
    assert tok.decode(ids) == "北京\ufffd是"
    with pytest.warns(UserWarning, match="invalid Unicode"):
        assert tok.decode(tok.encode_plain("a\udc80b")) == "a\ufffdb"


def test_server_refuses_a_lone_surrogate_escape_in_one_line(tmp_path):
    import json

    import httpx
    from test_serve import running

    from tianying.api import LLM
    from tianying.checkpoint import save_hf
    from tianying.config import Config
    from tianying.model import build_model
    from tianying.serve.app import create_app

    tok = Tokenizer.from_dir(FIXTURE_TOKENIZER)
    cfg = Config.from_name("test-gqa").replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                                max_position_embeddings=128)
    save_hf(build_model(cfg, seed=0), cfg, tmp_path / "m", tokenizer_dir=FIXTURE_TOKENIZER)
    with running(create_app(LLM.load(tmp_path / "m"))) as url:
        body = '{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}'
        r = httpx.post(url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        err = json.loads(r.text)["error"]  # JSON that is not valid Unicode: the parser's one line, a 400
        assert r.status_code == 400 and err["code"] == "invalid_json" and "escape" in err["message"]


def test_a_device_this_torch_cannot_use_is_one_line(capsys):
    from tianying.cli import main

    ckpt = str(Path(__file__).parents[1] / "models" / "demo")
    cases = [("cuda:x", "not a device"), ("tpu", "not a device"), ("cuda:99", "CUDA")]
    if not torch.cuda.is_available():  # this torch or this machine has no GPU: plain "cuda" is the case
        cases.append(("cuda", "CUDA"))
    for device, words in cases:
        assert main(["generate", ckpt, "--prompt", "hi", "--device", device]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
