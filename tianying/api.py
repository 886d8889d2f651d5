"""`LLM`: the Python entry point — load a checkpoint, generate, chat, stream.

    from tianying import LLM
    llm = LLM.load("models/demo")
    print(llm.generate("北京是", max_new_tokens=32))
    for piece in llm.chat([{"role": "user", "content": "你好"}], stream=True):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from tianying.config import Config
from tianying.errors import TianyingError
from tianying.generate import SamplingParams


class LLM:
    def __init__(self, model: torch.nn.Module, tokenizer, config: Config, template: Any = None,
                 path: str | Path | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.path = Path(path) if path else None
        self.template = _default_template(config, self.path, template)  # a tianying.templates template
        self._engine = None

    @property
    def engine(self):
        """The engine every generation of this LLM runs on (built on first use; `tianying serve` starts its
        worker thread)."""
        if self._engine is None:
            from tianying.engine import Engine

            self._engine = Engine(self.model, self.tokenizer)
        return self._engine

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: Any = None,
             template: str | Path | None = None, lora: str | Path | None = None, quantize: str | None = None,
             memory_limit: str | int | None = None, check_weights: bool = False,
             threads: int | str | None = None) -> LLM:
        """Load a checkpoint directory (Hugging Face or FlagAI layout) or a `.gguf` file, with its tokenizer.

        Args:
            dtype: "fp32" | "bf16" | "fp16" or a torch dtype; None → fp32 on CPU, the checkpoint's dtype on GPU.
            template: chat template: an Aquila template name or a Jinja file; default: the checkpoint's (see
                `tianying.templates.checkpoint_template`).
            lora: a PEFT adapter directory to apply on load.
            quantize: "int8" | "int4" to quantize weights on load.
            memory_limit: e.g. "2GiB": stream layers from disk to stay within the budget.
            check_weights: refuse a checkpoint holding NaN/Inf tensors, naming them (one line).
            threads: CPU threads for this process's torch ops: a count, or "auto" for the CLI's policy
                (`tianying.threads`); None leaves torch's setting alone.
        """
        from tianying.checkpoint import load_model
        from tianying.tokenizer import Tokenizer

        check_device(device)
        if threads is not None:
            from tianying import threads as _threads

            _threads.configure(None if threads == "auto" else threads)
        path = Path(path)
        if not path.exists():
            raise TianyingError(f"checkpoint directory {path} does not exist")
        if path.is_file() and (path.suffix.lower() == ".gguf" or _is_gguf(path)):  # in memory (tianying.gguf_io)
            return cls._load_gguf(path, device, dtype, template, lora, quantize, memory_limit)
        if not path.is_dir():
            raise TianyingError(f"{path} is not a checkpoint directory")
        from tianying.quantize.format import is_quantized_checkpoint

        if torch.device(device).type == "cpu":  # prefill transients go back to the OS (see tianying.memory)
            from tianying.memory import return_freed_memory

            return_freed_memory()
        extras = {k: v for k, v in dict(lora=lora, quantize=quantize, memory_limit=memory_limit).items() if v}
        if extras or is_quantized_checkpoint(path):
            model, config = _load_with_extras(path, device, dtype, **extras)
        else:
            model, config = load_model(path, device=device, dtype=dtype)
        if check_weights:  # streamed layers are not in memory: check those in the files they stream from
            from tianying.weights import check_files, check_finite

            if memory_limit:
                check_files(path)
            else:
                check_finite(model, path)
        tokenizer = Tokenizer.from_dir(path)
        # the tokenizer's special tokens win over config.json (v1 configs carry LLaMA's bogus 1/2)
        config.bos_token_id = tokenizer.bos_id if tokenizer.bos_id is not None else config.bos_token_id
        config.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else config.eos_token_id
        if tokenizer.vocab_size > config.vocab_size:
            raise TianyingError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                                f"{config.vocab_size} embedding rows")
        return cls(model, tokenizer, config, template=template, path=path)

    @classmethod
    def _load_gguf(cls, path: Path, device, dtype, template, lora, quantize, memory_limit) -> LLM:
        from tianying.gguf_io import load_gguf

        if memory_limit:
            raise TianyingError("memory_limit is not supported for GGUF files; convert it first (tianying convert)")
        model, config, tokenizer = load_gguf(path, device=device, dtype=dtype, dequantize=bool(quantize))
        if quantize:
            from tianying.quantize import apply_quantization

            apply_quantization(model, quantize)
        if lora is not None:
            from tianying.lora import apply_adapter

            apply_adapter(model, lora)
        if template is None and not config.chat_template and getattr(tokenizer, "chat_template", None):
            from tianying.templates import template_from_source

            roles = {f"{r}_token": tokenizer.id_to_token(i) for r, i in
                     (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id)) if i is not None}
            template = template_from_source(tokenizer.chat_template, path.stem, roles)  # the file's own
        return cls(model, tokenizer, config, template=template, path=path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ generation
    def sampling_params(self, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
                        top_p: float | None = None, repetition_penalty: float = 1.0,
                        stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                        seed: int | None = None, legacy: bool = False, **more: Any) -> SamplingParams:
        """SamplingParams with this model's EOS as the default stop id; `more`: presence_penalty,
        frequency_penalty, logit_bias, logprobs, prompt_logprobs, n, min_new_tokens."""
        if isinstance(stop, str):
            stop = [stop]
        ids = list(stop_token_ids) if stop_token_ids is not None else [self.config.eos_token_id]
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed, legacy=legacy,
                              stop_token_ids=tuple(i for i in ids if i is not None), stop=tuple(stop or ()),
                              **more)

    def generate(self, prompt: str | Sequence[str], *, stream: bool = False, bos: bool = False,
                 truncate: str | None = None, **sampling: Any) -> str | list[str] | Iterator[str]:
        """Complete `prompt` (a string, or a list of strings generated as one left-padded batch).

        Sampling keywords: max_new_tokens, temperature (0 = greedy), top_k, top_p, repetition_penalty,
        stop (strings), stop_token_ids (default: EOS), seed, legacy (the seed's predict() order).
        With stream=True (single prompt only) returns an iterator of text pieces. A prompt that leaves no room
        for max_new_tokens in the context is an error, or with truncate="left" loses its oldest tokens (warned).
        """
        params = self.sampling_params(**sampling)
        if isinstance(prompt, str):
            ids = self.fit_context(self.encode_prompt(prompt, bos=bos), params.max_new_tokens, truncate)
            pieces = self._stream([ids], params)
            if stream:
                return pieces
            return "".join(pieces)
        if stream:
            raise TianyingError("stream=True takes a single prompt")
        return self.generate_batch([self.fit_context(self.encode_prompt(p, bos=bos), params.max_new_tokens, truncate)
                                    for p in prompt], params)

    def chat(self, messages: Sequence[dict], template: Any = None, *, stream: bool = False,
             tools: Sequence[dict] | None = None, tool_choice: Any = None, response_format: dict | None = None,
             truncate: str | None = None, **sampling: Any) -> Any:
        """Reply to a conversation ([{"role", "content"}...]) using the checkpoint's chat template (or
        `template`: a name or a Jinja file). Special-token strings inside the messages stay plain text.
        `truncate`: as for generate().

        `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": …}})
        constrains the reply to JSON (of the schema). With OpenAI-style `tools` the result is a dict
        {"content": str | None, "tool_calls": [tianying.tools.ToolCall]} instead of a string; `tool_choice`
        "required" or {"type": "function", "function": {"name": …}} makes the reply a valid call.
        """
        from tianying import tools as tl
        from tianying.templates import encode_chat

        tpl = _default_template(self.config, self.path, template) if template is not None else self.template
        grammar = tl.response_grammar(response_format)
        fns = tl.functions(tools)
        mode, allowed = tl.chosen(tool_choice, fns)
        if fns:
            if stream:
                raise TianyingError("stream=True does not combine with tools (the reply is parsed when complete)")
            messages = tl.prepare(list(messages), fns, mode)
            if mode == "required":
                grammar = ("json_schema", tl.call_schema(allowed))
            text = self.chat(messages, template, truncate=truncate, grammar=grammar, **sampling)
            content, calls = tl.parse_reply(text, allowed, mode == "required") if mode != "none" else (text, [])
            return {"content": content, "tool_calls": calls}
        if grammar is not None:
            sampling["grammar"] = grammar
        # the seed's predict() appends one space after the rendered prompt
        ids = encode_chat(self.tokenizer, list(messages), tpl, suffix=" " if sampling.get("legacy") else "")
        stops = sampling.pop("stop", None) or []
        sampling["stop"] = list(tpl.stop_strings) + ([stops] if isinstance(stops, str) else list(stops))
        params = self.sampling_params(**sampling)
        pieces = self._stream([self.fit_context(ids, params.max_new_tokens, truncate)], params)
        return pieces if stream else "".join(pieces)

    @property
    def context_length(self) -> int | None:
        """Positions a prompt and its completion share; None for windowed attention (no hard limit)."""
        return None if self.config.attention_window else int(self.config.max_position_embeddings)

    def fit_context(self, ids: list[int], max_new_tokens: int, truncate: str | None = None) -> list[int]:
        """`ids`, or with truncate="left" its last tokens that leave room for max_new_tokens (with a warning);
        without truncate a prompt that does not fit is left for the engine to refuse."""
        limit = self.context_length
        if truncate is None or limit is None or len(ids) + max_new_tokens <= limit:
            return ids
        if truncate != "left":
            raise TianyingError(f"truncate must be 'left' or None, got {truncate!r}")
        keep = limit - max_new_tokens
        if keep < 1:
            raise TianyingError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the context of "
                                f"{limit} tokens")
        import warnings

        warnings.warn(f"the prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                      f"{limit} tokens: its first {len(ids) - keep} tokens are dropped", stacklevel=3)
        return ids[-keep:]

    def encode_prompt(self, prompt: str, bos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(prompt, bos=bos)
        if not ids:
            raise TianyingError("the prompt is empty (it encodes to no tokens)")
        return ids

    def generate_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """New token ids per prompt (stop ids excluded; text-level stops are applied)."""
        return self.engine.generate_ids(prompts, params)

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[str]:
        from tianying.engine import Request

        reqs = [Request(list(p), params) for p in prompts]
        texts = {r.id: "" for r in reqs}
        for r, ev in self.engine.run(reqs):
            if ev.error:
                raise _event_error(ev)
            texts[r.id] += ev.text
        return [_legacy_cleanup(texts[r.id]) if params.legacy else texts[r.id] for r in reqs]

    def _stream(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[str]:
        from tianying.engine import Request

        first = params.legacy  # the seed drops a single leading space of the reply
        for _, ev in self.engine.run([Request(list(prompts[0]), params)]):
            if ev.error:
                raise _event_error(ev)
            piece = ev.text
            if first and piece:
                piece, first = (piece[1:] if piece.startswith(" ") else piece), False
            if piece:
                yield piece

    @property
    def pad_id(self) -> int:
        return self._pad_id()

    def _pad_id(self) -> int:
        pad = self.config.pad_token_id
        return 0 if pad is None else int(pad)


def _is_gguf(path: Path) -> bool:
    from tianying.gguf_io import is_gguf

    return is_gguf(path)


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or one line saying why this torch cannot use it."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise TianyingError(f"device {device!r} is not a device torch knows ({e})") from None
    if d.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise TianyingError(f"device {device!r}: this torch ({torch.__version__}) was built without CUDA; "
                                "install a CUDA build of torch, or use --device cpu")
        if not torch.cuda.is_available():
            raise TianyingError(f"device {device!r}: torch sees no CUDA GPU here")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise TianyingError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise TianyingError(f"device {device!r}: MPS is not available in this torch on this machine")
    return d


def _event_error(ev) -> TianyingError:  # noqa: ANN001 - a tianying.engine.Event with an error
    from tianying.generate import GenerationError

    # the request's own fault (values, grammar) is a GenerationError naming it; anything else says it failed
    return GenerationError(ev.error) if ev.status < 500 else TianyingError(f"generation failed: {ev.error}")


def _legacy_cleanup(text: str) -> str:
    return text[1:] if text.startswith(" ") else text


def _default_template(config: Config, path: Path | None, template: Any = None):
    from tianying.templates import checkpoint_template

    return checkpoint_template(path, config, template)


def _load_with_extras(path: Path, device, dtype, lora=None, quantize=None, memory_limit=None):
    """Quantization and memory budgets live in tianying.quantize, adapters in tianying.lora (later floors)."""
    from tianying.quantize import load as load_quantized_or_budgeted

    model, config = load_quantized_or_budgeted(path, device=device, dtype=dtype, quantize=quantize,
                                               memory_limit=memory_limit)
    if lora is not None:
        from tianying.lora import apply_adapter

        apply_adapter(model, lora)
    return model, config
