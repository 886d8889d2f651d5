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
    from helpers import running, tiny_chat_checkpoint

    from tianying.api import LLM
    from tianying.serve.app import create_app

    with running(create_app(LLM.load(tiny_chat_checkpoint(tmp_path / "m")))) as url:
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
