"""Helpers the server tests share: a tiny random chat checkpoint, and uvicorn running an app in a thread."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import uvicorn

FIXTURE_TOKENIZER = Path(__file__).parent / "data" / "tokenizer"


def tiny_chat_checkpoint(out: Path, template: str = "aquila-chat", context: int = 256) -> Path:
    """A random test-gqa model with the fixture tokenizer, saved as a checkpoint with a chat template."""
    from tianying.checkpoint import save_hf
    from tianying.config import Config
    from tianying.model import build_model
    from tianying.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(FIXTURE_TOKENIZER)
    cfg = Config.from_name("test-gqa").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                                eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                                                chat_template=template, initializer_range=0.2,
                                                max_position_embeddings=context)
    save_hf(build_model(cfg, seed=0), cfg, out, tokenizer_dir=FIXTURE_TOKENIZER)
    return out


@contextlib.contextmanager
def running(app, config: uvicorn.Config | None = None):
    """uvicorn in a thread on a free port; yields the base URL."""
    server = uvicorn.Server(config or uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
