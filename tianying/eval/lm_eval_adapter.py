"""`lm_eval --model tianying --model_args pretrained=CKPT ...`: EleutherAI lm-evaluation-harness on our checkpoints.

Install with the extra (`pip install tianying[lm-eval]`, i.e. `lm_eval>=0.4`). lm-eval finds models only
in its registry, so either `import tianying.eval.lm_eval_adapter` before `lm_eval.simple_evaluate(model=
"tianying", ...)`, or run its CLI through this module, which registers the model first:

    python -m tianying.eval.lm_eval_adapter run --model tianying --model_args pretrained=CKPT --tasks arc_easy

Model args: pretrained (checkpoint dir), device, dtype (fp32/bf16/fp16), batch_size, max_length, chat_template.
Log-likelihoods go through the same shared-prompt scoring as `tianying eval`; requests with the same context
(the choices of one multiple-choice item) are scored together.
"""

from __future__ import annotations

from collections import defaultdict

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from tianying.eval.harness import EvalLM
from tianying.eval.scoring import rolling_nll, score_continuations


@register_model("tianying")
class TianyingLM(LM):
    def __init__(self, pretrained: str, device: str = "cpu", dtype: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, chat_template: str | None = None, **_: object) -> None:
        super().__init__()
        import torch

        from tianying.api import LLM

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's CLI passes cuda by default
        llm = LLM.load(pretrained, device=device, dtype=dtype)
        bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.lm = EvalLM.from_llm(llm, chat_template=chat_template, batch_size=bs)
        if max_length:
            self.lm.max_length = int(max_length)
        self.llm = llm

    # ------------------------------------------------------------------ helpers
    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Move the context's trailing spaces into the continuation (as lm-eval's HF model does), encode both."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = self.lm.encode(context) if context else [self.lm.eos_id]
        return ctx, self.lm.encode(continuation)

    # ------------------------------------------------------------------ lm-eval API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = defaultdict(list)
        for i, req in enumerate(requests):
            ctx, cont = self._pair(*req.args)
            keep = self.lm.max_length - len(cont)
            groups[tuple(ctx[-keep:])].append((i, cont))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for ctx, items in groups.items():
            greedy: list[bool] = []
            scores = score_continuations(self.lm.model, list(ctx), [c for _, c in items], greedy)
            for (i, _), s, g in zip(items, scores, greedy):
                out[i] = (s, g)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        res = []
        for req in requests:
            ids = self.lm.encode(req.args[0])
            nll, _ = rolling_nll(self.lm.model, ids, self.lm.eos_id, self.lm.max_length,
                                 batch_size=self.lm.batch_size) if ids else (0.0, 0)
            res.append(-nll)
        return res

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tianying.eval.metrics import cut_at_stops

        res = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temp = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            text = self.lm.generate([self.lm.wrap(context)], int(kwargs.get("max_gen_toks", 256)), until,
                                    temperature=temp)[0]
            res.append(cut_at_stops(text, until))
        return res


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
