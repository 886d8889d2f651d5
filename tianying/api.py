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
from tianying.generate import SamplingParams, StopMatcher, generate_tokens


class LLM:
    def __init__(self, model: torch.nn.Module, tokenizer, config: Config, template: str | None = None,
                 path: str | Path | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.path = Path(path) if path else None
        self.template = template or _default_template(config, self.path)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: Any = None,
             template: str | None = None, lora: str | Path | None = None, quantize: str | None = None,
             memory_limit: str | int | None = None) -> LLM:
        """Load a checkpoint directory (Hugging Face or FlagAI layout) or a `.gguf` file, with its tokenizer.

        Args:
            dtype: "fp32" | "bf16" | "fp16" or a torch dtype; None → fp32 on CPU, the checkpoint's dtype on GPU.
            template: chat template name; default from the checkpoint (config.json), else by model name.
            lora: a PEFT adapter directory to apply on load.
            quantize: "int8" | "int4" to quantize weights on load.
            memory_limit: e.g. "2GiB": stream layers from disk to stay within the budget.
        """
        from tianying.checkpoint import load_model
        from tianying.tokenizer import Tokenizer

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
        return cls(model, tokenizer, config, template=template, path=path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ generation
    def sampling_params(self, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
                        top_p: float | None = None, repetition_penalty: float = 1.0,
                        stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                        seed: int | None = None, legacy: bool = False) -> SamplingParams:
        if isinstance(stop, str):
            stop = [stop]
        ids = list(stop_token_ids) if stop_token_ids is not None else [self.config.eos_token_id]
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed, legacy=legacy,
                              stop_token_ids=tuple(i for i in ids if i is not None), stop=tuple(stop or ()))

    def generate(self, prompt: str | Sequence[str], *, stream: bool = False, bos: bool = False,
                 **sampling: Any) -> str | list[str] | Iterator[str]:
        """Complete `prompt` (a string, or a list of strings generated as one left-padded batch).

        Sampling keywords: max_new_tokens, temperature (0 = greedy), top_k, top_p, repetition_penalty,
        stop (strings), stop_token_ids (default: EOS), seed, legacy (the seed's predict() order).
        With stream=True (single prompt only) returns an iterator of text pieces.
        """
        params = self.sampling_params(**sampling)
        if isinstance(prompt, str):
            ids = self.encode_prompt(prompt, bos=bos)
            pieces = self._stream([ids], params)
            if stream:
                return pieces
            return "".join(pieces)
        if stream:
            raise TianyingError("stream=True takes a single prompt")
        return self.generate_batch([self.encode_prompt(p, bos=bos) for p in prompt], params)

    def chat(self, messages: Sequence[dict], template: str | None = None, *, stream: bool = False,
             **sampling: Any) -> str | Iterator[str]:
        """Reply to a conversation ([{"role", "content"}...]) using the checkpoint's chat template."""
        from tianying.templates import get_template, render_chat

        tpl = get_template(template or self.template)
        prompt = render_chat(list(messages), tpl.name)
        if sampling.get("legacy"):
            prompt += " "  # the seed's predict() appends one space after the rendered prompt
        stops = sampling.pop("stop", None) or []
        sampling["stop"] = list(tpl.stop_strings) + ([stops] if isinstance(stops, str) else list(stops))
        return self.generate(prompt, stream=stream, **sampling)

    def encode_prompt(self, prompt: str, bos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(prompt, bos=bos)
        if not ids:
            raise TianyingError("the prompt is empty (it encodes to no tokens)")
        return ids

    def generate_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """New token ids per prompt (stop ids excluded; text-level stops are not applied)."""
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        stop_ids = set(params.stop_token_ids)
        for step in generate_tokens(self.model, prompts, params, pad_id=self._pad_id(), device=self.device):
            for i, t in enumerate(step.tolist()):
                if done[i]:
                    continue
                if t in stop_ids:
                    done[i] = True
                else:
                    rows[i].append(t)
        return rows

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[str]:
        out = []
        for ids in self.generate_ids(prompts, params):
            m = StopMatcher(params.stop)
            text = m.feed(self.tokenizer.decode(ids)) + m.flush()
            out.append(_legacy_cleanup(text) if params.legacy else text)
        return out

    def _stream(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[str]:
        decoder = self.tokenizer.stream_decoder()
        matcher = StopMatcher(params.stop)
        stop_ids = set(params.stop_token_ids)
        first = params.legacy  # the seed drops a single leading space of the reply
        for step in generate_tokens(self.model, prompts, params, pad_id=self._pad_id(), device=self.device):
            t = int(step[0])
            if t in stop_ids:
                break
            piece = matcher.feed(decoder.add(t))
            if first and piece:
                piece, first = (piece[1:] if piece.startswith(" ") else piece), False
            if piece:
                yield piece
            if matcher.stopped:
                return
        tail = matcher.feed(decoder.flush()) + matcher.flush()
        if first and tail.startswith(" "):
            tail = tail[1:]
        if tail:
            yield tail

    @property
    def pad_id(self) -> int:
        return self._pad_id()

    def _pad_id(self) -> int:
        pad = self.config.pad_token_id
        return 0 if pad is None else int(pad)


def _is_gguf(path: Path) -> bool:
    from tianying.gguf_io import is_gguf

    return is_gguf(path)


def _legacy_cleanup(text: str) -> str:
    return text[1:] if text.startswith(" ") else text


def _default_template(config: Config, path: Path | None) -> str:
    from tianying.templates import template_for_model

    if config.chat_template:
        return config.chat_template
    name = config.name if config.name not in ("custom", None) else (path.name if path else "")
    return template_for_model(name)


def _load_with_extras(path: Path, device, dtype, lora=None, quantize=None, memory_limit=None):
    """Quantization and memory budgets live in tianying.quantize, adapters in tianying.lora (later floors)."""
    from tianying.quantize import load as load_quantized_or_budgeted

    model, config = load_quantized_or_budgeted(path, device=device, dtype=dtype, quantize=quantize,
                                               memory_limit=memory_limit)
    if lora is not None:
        from tianying.lora import apply_adapter

        apply_adapter(model, lora)
    return model, config
