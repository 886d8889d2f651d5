"""FlagAI's Aquila API over tianying: keep a FlagAI script, change its imports.

    from tianying.compat.flagai import AutoLoader, Predictor      # was: from flagai.auto_model.auto_loader ...
    loader = AutoLoader("aquila2", model_dir="./checkpoints", model_name="AquilaChat2-7B")
    model, tokenizer = loader.get_model(), loader.get_tokenizer()
    print(model.predict("北京有什么好玩的？", tokenizer=tokenizer, max_gen_len=200, device="cpu"))

What is kept (seed-spec §4.2, §4.3): FlagAI's checkpoint layout (`model_dir/model_name`, also lower-cased),
`predict()`'s signature and defaults, its template per model name (AquilaChat2-7B → aquila-v1, -34B →
aquila-legacy, -70B-Expr → aquila-v2, the -16K models → aquila, anything else → aquila-chat; `convo_template`
overrides), its sampling order (top-p → top-k → temperature, `</s>` never first; tianying's `legacy=True`),
temperature 0 as top-k 1, the trailing space after the prompt, the output cut at `###`, `[UNK]` and `</s>` with
one leading space dropped, `sft=False` as the raw prompt, and `history` updated in place. v1's
`Predictor.predict_generate_randomsample` samples temperature → top-k → top-p and stops at `</s>` or the unk id.

Where we deliberately differ:
- It runs where the model is, CPU included: `device=` of predict() is ignored, and `.cuda()` / `.to("cuda")`
  on a machine without CUDA keep the model on the CPU (with a warning) instead of failing. FlagAI could not
  generate on CPU at all. fp16 is used on GPUs only (fp32 on CPU).
- `history` is read in list order (oldest turn first, as FlagAI renders it) and the new turn is appended at
  the end; FlagAI popped every turn it rendered and put back only the newest pair at the front, so from the
  third call on its model saw only the previous turn. When the prompt would not fit, the oldest turns go.
- `model_name=""` in predict() means the name the model was loaded under (FlagAI: the default template).
- `seed` seeds this generation's own generator, not Python's, NumPy's and torch's global ones.
- `all_devices=True` puts the whole model on one device (the first GPU, else the CPU); tianying has no layer
  split across GPUs (`LLM.load(memory_limit=...)` streams layers for models larger than memory).
- Nothing is downloaded: a missing checkpoint is an error naming the folder to put it in.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tianying.errors import TianyingError

FLAGAI_STOPS = ("###", "[UNK]", "</s>")  # predict() cuts its output at the first of these
TASKS = ("aquila2", "lm")
# FlagAI keywords that change nothing here (its own loading machinery)
_QUIET = {"only_download_config", "low_cpu_mem_usage", "use_cache", "model_max_length", "inference_mode",
          "device_map", "trust_remote_code"}


class FlagAIError(TianyingError):
    """A FlagAI call this layer cannot honour (unknown task, missing checkpoint, malformed history)."""


# ---------------------------------------------------------------------------------------------- prompts
def template_for(model_name: str, convo_template: str = ""):
    """The template FlagAI's predict() uses: `convo_template` if given, else the one for `model_name`."""
    from tianying.templates import get_template, template_for_model

    return get_template(convo_template or template_for_model(model_name or ""))


def history_messages(history: Sequence | None) -> list[dict]:
    """FlagAI's history ([(role, text), ...], role "ASSISTANT" or anything else for the user; dicts with role
    and content also taken) as chat messages, in list order."""
    out = []
    for i, h in enumerate(history or ()):
        if isinstance(h, dict):
            role, text = h.get("role"), h.get("content")
        elif isinstance(h, (list, tuple)) and len(h) == 2:
            role, text = h
        else:
            raise FlagAIError(f"history[{i}] is {h!r}; expected a (role, text) pair such as ('USER', '你好')")
        if not isinstance(text, str):
            raise FlagAIError(f"history[{i}] has no text (got {type(text).__name__})")
        r = str(role).lower()
        out.append({"role": "assistant" if r in ("assistant", "gpt", "bot") else
                    "system" if r == "system" else "user", "content": text})
    return out


def prompt_ids(tokenizer, text: str, history: Sequence | None, template, budget: int) -> list[int]:
    """Ids of the history + `text` rendered in `template` plus FlagAI's trailing space; the oldest turns
    (user and assistant together) are dropped while the prompt is longer than `budget` tokens."""
    from tianying.templates import encode_chat

    past = history_messages(history)
    system = past[:1] if past and past[0]["role"] == "system" else []
    turns = past[len(system):]
    while True:
        ids = encode_chat(tokenizer, system + turns + [{"role": "user", "content": text}], template, suffix=" ")
        if len(ids) <= budget or not turns:
            return ids
        turns = turns[2:]


def drop_leading_space(text: str) -> str:
    return text[1:] if text.startswith(" ") else text


def run(llm, ids: list[int], params) -> tuple[str, list[int], list]:
    """(text, token ids, TokenLogprobs) of one generation on the LLM's engine."""
    from tianying.engine import Request

    text, tokens, lps = "", [], []
    for _, ev in llm.engine.run([Request(list(ids), params)]):
        if ev.error:
            raise FlagAIError(f"generation failed: {ev.error}")
        text, tokens, lps = text + ev.text, tokens + ev.tokens, lps + ev.logprobs
    return text, tokens, lps


# ---------------------------------------------------------------------------------------------- model
class FlagAIModel:
    """What `AutoLoader.get_model()` returns: `predict()`, and enough of a torch module for FlagAI scripts
    (`eval`, `to`, `cuda`, `half`; anything else is the underlying `tianying.model.Transformer`'s)."""

    def __init__(self, llm, model_name: str = "", task_name: str = "aquila2") -> None:
        self.llm, self.model_name, self.task_name = llm, model_name, task_name

    def predict(self, text: str, tokenizer=None, max_gen_len: int = 200, top_p: float = 0.95, seed: int = 1234,
                topk: int = 100, temperature: float = 0.9, sft: bool = True, convo_template: str = "",
                device: str = "cuda", model_name: str = "", history: list | None = None, max_token: int = 20480,
                **ignored: Any) -> str:
        """FlagAI's `AquilaForCausalLM.predict` (defaults of the model cards' predict.py); `tokenizer` and
        `device` are accepted and ignored (the loaded tokenizer is used, on the model's device)."""
        llm = self.llm
        if not isinstance(text, str) or not text:
            raise FlagAIError("predict() needs a non-empty text")
        if max_gen_len < 1:
            raise FlagAIError(f"max_gen_len must be ≥ 1, got {max_gen_len}")
        if sft:
            budget = min(int(max_token), int(llm.config.max_position_embeddings) - max_gen_len)
            ids = prompt_ids(llm.tokenizer, text, history, template_for(model_name or self.model_name,
                                                                         convo_template), budget)
        else:
            ids = llm.encode_prompt(text)
        params = llm.sampling_params(max_new_tokens=max_gen_len, temperature=temperature, top_k=topk or None,
                                     top_p=top_p, seed=seed if seed and seed > 0 else None, legacy=True,
                                     stop=list(FLAGAI_STOPS))
        out = drop_leading_space(run(llm, ids, params)[0])
        if isinstance(history, list):
            history.extend([("USER", text), ("ASSISTANT", out)])
        return out

    # ------------------------------------------------------------------ torch-module look-alike
    def eval(self) -> FlagAIModel:
        self.llm.model.eval()
        return self

    def to(self, device=None, dtype=None, **_: Any) -> FlagAIModel:  # noqa: ANN001
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if device is not None:
            device = _usable_device(device)
        if dtype is not None and (device or self.llm.device).type == "cpu" and dtype == torch.float16:
            dtype = None  # fp16 on CPU is slow and partly unsupported: the model stays fp32 there
        p = next(self.llm.model.parameters())
        if (device is not None and device != p.device) or (dtype is not None and dtype != p.dtype):
            self.llm.model.to(device=device, dtype=dtype)
            self.llm._engine = None  # the engine holds a cache on the old device/dtype
        return self

    def cuda(self, device=None) -> FlagAIModel:  # noqa: ANN001
        return self.to("cuda" if device is None else f"cuda:{device}" if isinstance(device, int) else device)

    def half(self) -> FlagAIModel:
        return self.to(torch.float16)

    def __getattr__(self, name: str):  # noqa: ANN204 - model.parameters(), model.config, ...
        if name in ("llm", "model_name", "task_name"):
            raise AttributeError(name)
        return getattr(self.llm.model, name)


def _usable_device(device) -> torch.device:  # noqa: ANN001
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device {device!r} asked for but CUDA is not available; running on the CPU", stacklevel=3)
        return torch.device("cpu")
    return d


def _as_llm(model):  # noqa: ANN001, ANN202
    if isinstance(model, FlagAIModel):
        return model.llm
    from tianying.api import LLM

    if isinstance(model, LLM):
        return model
    raise FlagAIError(f"Predictor needs the model from AutoLoader(...).get_model(), got a {type(model).__name__}")


class Predictor:
    """FlagAI's v1 `Predictor(model, tokenizer)` for Aquila models."""

    def __init__(self, model, tokenizer=None) -> None:  # noqa: ANN001
        self.llm = _as_llm(model)
        self.model, self.tokenizer = model, tokenizer or self.llm.tokenizer

    def predict_generate_randomsample(self, text: str, input_max_length: int = 256, out_max_length: int = 200,
                                      top_k: int = 30, top_p: float = 1.0, repetition_penalty: float = 1.0,
                                      temperature: float = 1.0, seed: int | None = None, **ignored: Any) -> str:
        """v1 `aquila_generate` on the raw text (no template, no BOS): temperature → top-k → top-p, stop at
        `</s>` or the unk id, temperature 0 = greedy. As in FlagAI, `input_max_length` and
        `repetition_penalty` are accepted and ignored for Aquila; `seed` (ours) makes a run reproducible."""
        llm = self.llm
        if not isinstance(text, str) or not text:
            raise FlagAIError("predict_generate_randomsample() needs a non-empty text")
        tok = llm.tokenizer
        stops = [i for i in (llm.config.eos_token_id, tok.unk_id) if i is not None]
        params = llm.sampling_params(max_new_tokens=out_max_length, temperature=temperature, top_k=top_k or None,
                                     top_p=top_p, seed=seed, stop_token_ids=stops)
        return run(llm, llm.encode_prompt(text), params)[0]


# ---------------------------------------------------------------------------------------------- loader
class AutoLoader:
    """FlagAI's `AutoLoader` for Aquila checkpoints: "aquila2" (Aquila2 HF layout) and "lm" (v1 FlagAI layout).

    Loads `model_dir/model_name` (or its lower-cased name, FlagAI's download folder) with `tianying.LLM.load`.
    `lora_dir`: a PEFT LoRA adapter applied on load; `qlora_dir`: a Q-LoRA adapter, its base held in NF4 as it
    was trained; `quantization_config` (bitsandbytes' load_in_4bit / load_in_8bit) → NF4 / int8 weights.
    """

    def __init__(self, task_name: str = "lm", model_name: str = "", model_dir: str = "./checkpoints/",
                 lora_dir: str | None = None, qlora_dir: str | None = None, all_devices: bool = False,
                 inference_mode: bool = True, device: str = "cpu", use_cache: bool = True, fp16: bool = False,
                 torch_dtype: Any = None, quantization_config: Any = None, **ignored: Any) -> None:
        from tianying.api import LLM

        if task_name not in TASKS:
            raise FlagAIError(f"task_name {task_name!r} is not supported here; tianying loads Aquila models: "
                              f"{' or '.join(map(repr, TASKS))}")
        if not model_name:
            raise FlagAIError("AutoLoader needs model_name (the checkpoint's folder under model_dir)")
        if lora_dir and qlora_dir:
            raise FlagAIError("pass lora_dir or qlora_dir, not both")
        unknown = sorted(set(ignored) - _QUIET)
        if unknown:
            warnings.warn(f"AutoLoader ignores {', '.join(unknown)}", stacklevel=2)
        if not inference_mode:
            warnings.warn("AutoLoader(inference_mode=False): this layer loads for inference; fine-tune with "
                          "`tianying finetune`", stacklevel=2)
        self.task_name, self.model_name = task_name, model_name
        self.path = _checkpoint_dir(Path(model_dir), model_name)
        dev = _usable_device("cuda" if all_devices and torch.cuda.is_available() else device)
        dtype = None  # fp32 on CPU, the checkpoint's own dtype on a GPU
        if dev.type != "cpu" and (torch_dtype is not None or fp16):
            dtype = torch_dtype if torch_dtype is not None else torch.float16
        elif torch_dtype is not None and torch_dtype != torch.float16:
            dtype = torch_dtype
        four, eight = _bnb_bits(quantization_config)
        self.llm = LLM.load(self.path, device=dev, dtype=dtype, lora=lora_dir or None,
                            quantize="int8" if eight else None)
        if four and not qlora_dir:
            from tianying.nf4 import quantize_model_nf4

            quantize_model_nf4(self.llm.model)
        if qlora_dir:
            from tianying.lora import apply_adapter

            apply_adapter(self.llm.model, qlora_dir, base="nf4")
        self.model = FlagAIModel(self.llm, model_name, task_name)

    def get_model(self) -> FlagAIModel:
        return self.model

    def get_tokenizer(self):  # noqa: ANN201 - tianying.tokenizer.Tokenizer (encode, decode, get_vocab, ...)
        return self.llm.tokenizer


def _checkpoint_dir(model_dir: Path, model_name: str) -> Path:
    for p in (model_dir / model_name, model_dir / model_name.lower()):
        if p.is_dir():
            return p
    raise FlagAIError(f"no checkpoint at {model_dir / model_name.lower()} (FlagAI would download it; tianying "
                      "never downloads: put the checkpoint's files in that folder)")


def _bnb_bits(cfg: Any) -> tuple[bool, bool]:
    """(load_in_4bit, load_in_8bit) of a bitsandbytes BitsAndBytesConfig or a dict (no bitsandbytes needed)."""
    if cfg is None:
        return False, False
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    return bool(get("load_in_4bit", False)), bool(get("load_in_8bit", False))
