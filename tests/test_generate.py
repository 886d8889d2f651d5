"""Sampling against hand-computed expectations (mock models of fixed logits) and greedy decoding against
transformers' `generate(do_sample=False)` on the same random weights."""

import math

import pytest
import torch
from torch import nn

from tianying.config import Config
from tianying.generate import (
    GenerationError,
    SamplingParams,
    StopMatcher,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    process_logits,
)
from tianying.model import build_model


def generate_tokens(model, prompts, params):
    """New ids of one prompt (stop ids end it and are not included) through the engine."""
    from tianying.engine import Engine

    out = Engine(model, prefix_cache_bytes=0).generate_ids(prompts, params)
    return out[0] if len(prompts) == 1 else out


class FixedLogits(nn.Module):
    """Returns the same next-token logits at every position (no cache needed)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)
        self.config = Config.from_name("test-mha").replace(vocab_size=len(logits), max_position_embeddings=1024)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids, cache=None, positions=None, pad_mask=None, last_only=False):
        if cache is not None:
            cache.end(cache.begin(ids.shape[1]))
        T = 1 if last_only else ids.shape[1]
        return self.logits.expand(ids.shape[0], T, -1)


def kept(logits):
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def test_top_k_keeps_exactly_k_largest():
    x = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert kept(apply_top_k(x, 2)) == {1, 3}
    assert kept(apply_top_k(x, 1)) == {1}
    assert kept(apply_top_k(x, 0)) == {0, 1, 2, 3, 4}


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    x = probs.log()
    assert kept(apply_top_p(x, 0.5)) == {0}  # 0.5 already reaches p
    assert kept(apply_top_p(x, 0.6)) == {0, 1}
    assert kept(apply_top_p(x, 0.86)) == {0, 1, 2, 3}
    assert kept(apply_top_p(x, 0.01)) == {0}  # never empty
    assert kept(apply_top_p(x, 1.0)) == {0, 1, 2, 3, 4}


def test_repetition_penalty_divides_positive_multiplies_negative():
    x = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(x, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_temperature_scales_before_topk_in_standard_order():
    p = SamplingParams(temperature=2.0, top_k=2)
    out = process_logits(torch.tensor([[4.0, 2.0, 0.0]]), p)
    assert out[0, 0].item() == 2.0 and out[0, 1].item() == 1.0 and math.isinf(out[0, 2].item())


def test_legacy_order_chooses_nucleus_on_untempered_logits():
    # softmax([2, 1, 0]) = [.665, .245, .090]; top_p .7 keeps {0, 1} before temperature 10 flattens them
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    legacy = process_logits(logits, SamplingParams(temperature=10.0, top_p=0.7, legacy=True))
    standard = process_logits(logits, SamplingParams(temperature=10.0, top_p=0.7))
    assert kept(legacy) == {0, 1}
    assert kept(standard) == {0, 1, 2}  # after T=10 the distribution is flat: all three needed for .7


def test_legacy_bans_eos_as_first_token_and_greedy_is_top1():
    model = FixedLogits([0.0, 1.0, 5.0])  # id 2 is the most likely and is the stop id
    p = SamplingParams(max_new_tokens=2, legacy=True, stop_token_ids=(2,))
    assert p.top_k == 1 and p.temperature == 1.0
    toks = [int(t) for t in generate_tokens(model, [[0]], p)]
    assert toks == [1]  # then the stop id 2


def test_greedy_and_stop_ids():
    model = FixedLogits([0.0, 3.0, 1.0])
    toks = [int(t) for t in generate_tokens(model, [[0, 1]], SamplingParams(max_new_tokens=5))]
    assert toks == [1] * 5
    toks = [int(t) for t in generate_tokens(model, [[0]], SamplingParams(max_new_tokens=5, stop_token_ids=(1,)))]
    assert toks == []  # the first token is the stop id


def test_seed_reproduces_and_sampling_follows_distribution():
    model = FixedLogits([0.0, math.log(3.0), float("-inf")])  # p = [.25, .75, 0]
    p = SamplingParams(max_new_tokens=400, temperature=1.0, seed=7)
    a = [int(t) for t in generate_tokens(model, [[0]], p)]
    b = [int(t) for t in generate_tokens(model, [[0]], p)]
    assert a == b
    assert 2 not in a
    assert 0.65 < a.count(1) / len(a) < 0.85
    c = [int(t) for t in generate_tokens(model, [[0]], SamplingParams(max_new_tokens=400, temperature=1.0, seed=8))]
    assert c != a


def test_top_k_sampling_only_draws_survivors():
    model = FixedLogits([1.0, 0.9, 0.8, 0.7])
    toks = [int(t) for t in generate_tokens(model, [[0]], SamplingParams(max_new_tokens=200, temperature=1.0,
                                                                           top_k=2, seed=0))]
    assert set(toks) == {0, 1}


def test_bad_params_are_errors():
    for kw in (dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=-1),
               dict(repetition_penalty=0)):
        with pytest.raises(GenerationError):
            SamplingParams(**kw)


def test_stop_matcher_holds_back_partial_stop():
    m = StopMatcher(["###", "</s>"])
    out = m.feed("Hello #") + m.feed("#") + m.feed(" world")
    assert out == "Hello ## world" and not m.stopped
    m = StopMatcher(["###"])
    out = m.feed("ab#") + m.feed("#") + m.feed("#cd")
    assert out == "ab" and m.stopped
    m = StopMatcher(["</s>"])
    assert m.feed("x</") == "x" and m.flush() == "</"


# ------------------------------------------------------------------------------------------ vs transformers
def hf_twin(cfg, model):
    import transformers  # the reference (dev dependency): missing it must fail, not skip
    hcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items()
                                       if k not in ("architectures", "model_type")})
    hf = transformers.LlamaForCausalLM(hcfg).eval()
    hf.load_state_dict(model.state_dict())
    return hf


@pytest.mark.parametrize("name", ["test-mha", "test-gqa"])
def test_greedy_equals_transformers(name):
    cfg = Config.from_name(name)
    model = build_model(cfg, seed=1).eval()
    hf = hf_twin(cfg, model)
    prompt = torch.randint(3, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    ours = [int(t) for t in generate_tokens(model, [prompt[0].tolist()], SamplingParams(max_new_tokens=24))]
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=24,
                          min_new_tokens=24, eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, 9:].tolist()


def test_batch_of_different_lengths_equals_unbatched():
    cfg = Config.from_name("test-gqa")
    model = build_model(cfg, seed=2).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 11, 1, 8)]
    p = SamplingParams(max_new_tokens=12)
    alone = [[int(t) for t in generate_tokens(model, [pr], p)] for pr in prompts]
    assert generate_tokens(model, prompts, p) == alone


def test_batch_of_different_lengths_matches_transformers_left_padded():
    cfg = Config.from_name("test-mha")
    model = build_model(cfg, seed=4).eval()
    hf = hf_twin(cfg, model)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    p = SamplingParams(max_new_tokens=10)
    ours = torch.tensor(generate_tokens(model, prompts, p))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 11, 12, 13]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, min_new_tokens=10,
                          eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == ref[:, 6:].tolist()


# ------------------------------------------------------------------------------------------ the engine's sampler
def _events(model, prompts, params, **kw):
    from tianying.engine import Engine, Request

    engine = Engine(model, **kw)
    reqs = [Request(list(p), params) for p in prompts]
    out = {r.id: [] for r in reqs}
    for r, ev in engine.run(reqs):
        out[r.id].append(ev)
    return [out[r.id] for r in reqs], engine


def test_presence_and_frequency_penalties_are_openais_formula():
    # score = logit − 0.2·count: [0, 1, .9] → 1; [0, .8, .9] → 2; [0, .8, .7] → 1; [0, .6, .7] → 2; ...
    model = FixedLogits([0.0, 1.0, 0.9])
    toks = generate_tokens(model, [[0]], SamplingParams(max_new_tokens=6, frequency_penalty=0.2))
    assert toks == [1, 2, 1, 2, 1, 2]
    # score = logit − 0.5·[count > 0]: [0, 1, .9] → 1; [0, .5, .9] → 2; [0, .5, .4] → 1, and so on
    toks = generate_tokens(model, [[0]], SamplingParams(max_new_tokens=4, presence_penalty=0.5))
    assert toks == [1, 2, 1, 1]
    toks = generate_tokens(model, [[0]], SamplingParams(max_new_tokens=3, presence_penalty=-2.0))
    assert toks == [1, 1, 1]


def test_logit_bias_and_logprobs():
    model = FixedLogits([0.0, 1.0, 0.5])
    assert generate_tokens(model, [[0]], SamplingParams(max_new_tokens=3, logit_bias={0: 2.0})) == [0, 0, 0]
    (evs,), _ = _events(model, [[0]], SamplingParams(max_new_tokens=2, logprobs=2))
    lp = torch.tensor([0.0, 1.0, 0.5]).log_softmax(-1)
    first = evs[0].logprobs[0]
    assert first.token == 1 and first.logprob == pytest.approx(float(lp[1]), abs=1e-6)
    assert [t for t, _ in first.top] == [1, 2] and first.top[1][1] == pytest.approx(float(lp[2]), abs=1e-6)


def test_n_choices_prefill_the_prompt_once():
    cfg = Config.from_name("test-gqa")
    model = build_model(cfg, seed=2).eval()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    prompt = torch.randint(3, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    (evs,), _ = _events(model, [prompt], SamplingParams(max_new_tokens=5, temperature=1.0, seed=1, n=3),
                        max_batch=3)
    assert sorted(seen, reverse=True)[:2] == [20, 1]  # one prefill of the prompt, then one-token steps
    toks = [[t for e in evs if e.index == i for t in e.tokens] for i in range(3)]
    assert all(len(t) == 5 for t in toks) and len({tuple(t) for t in toks}) == 3


def test_prefix_cache_reuses_blocks_and_gives_the_same_logprobs():
    cfg = Config.from_name("test-gqa")
    model = build_model(cfg, seed=3).eval()
    g = torch.Generator().manual_seed(1)
    system = torch.randint(3, cfg.vocab_size, (40,), generator=g).tolist()
    turns = [system + torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 9)]
    p = SamplingParams(max_new_tokens=6, logprobs=3)
    from tianying.engine import Engine, Request

    engine = Engine(model)
    cold, warm = [], []
    for prompt in turns:
        evs = [ev for _, ev in Engine(model, prefix_cache_bytes=0).run([Request(prompt, p)])]
        cold.append([x for e in evs for x in e.logprobs])
        evs = [ev for _, ev in engine.run([Request(prompt, p)])]
        warm.append([x for e in evs for x in e.logprobs])
        cached = evs[0].cached_tokens
    assert cached == 32  # the second prompt found the first one's two full 16-token blocks of the system part
    for a, b in zip(cold, warm):
        assert [x.token for x in a] == [x.token for x in b]
        assert [x.logprob for x in a] == pytest.approx([x.logprob for x in b], abs=1e-5)
    # bounded in bytes: a budget smaller than one block keeps none
    small = Engine(model, prefix_cache_bytes=1)
    small.generate_ids([turns[0]], SamplingParams(max_new_tokens=2))
    assert len(small.prefix.blocks) == 0 and small.prefix.bytes == 0


def test_a_failing_request_fails_alone():
    cfg = Config.from_name("test-gqa")
    model = build_model(cfg, seed=3).eval()
    prompts = [[5, 6, 7], [8, 9]]
    good = SamplingParams(max_new_tokens=10)
    from tianying.engine import Engine, Request

    alone = Engine(model).generate_ids([prompts[0]], good)[0]
    engine = Engine(model)
    bad = Request(prompts[1], SamplingParams(max_new_tokens=10, temperature=1.0, repetition_penalty=1e-308))
    ok = Request(prompts[0], good)
    out = {ok.id: [], bad.id: []}
    for r, ev in engine.run([ok, bad]):
        out[r.id].append(ev)
    assert out[bad.id][-1].finish_reason == "error" and out[bad.id][-1].status == 400
    assert [t for e in out[ok.id] for t in e.tokens] == alone and out[ok.id][-1].finish_reason == "length"
    with pytest.raises(GenerationError, match="seed"):
        SamplingParams(seed=2**80)


@pytest.mark.parametrize("logits, ok", [([0.0, float("nan"), 1.0], False), ([float("-inf")] * 3, False),
                                        ([0.0, float("inf"), 1.0], True), ([float("nan"), float("inf"), 1.0], False),
                                        ([float("-inf"), -3.0, float("-inf")], True)],
                         ids=["nan", "nothing-finite", "+inf", "nan+inf", "one-finite"])
def test_rows_with_nan_or_nothing_finite_fail(logits, ok):
    """A row with a NaN, or with no finite logit, fails its request; one +inf or one finite value does not."""
    from tianying.engine import Engine, Request

    engine = Engine(FixedLogits(logits), prefix_cache_bytes=0)
    req = Request([0, 0], SamplingParams(max_new_tokens=1))
    last = [ev for _, ev in engine.run([req])][-1]
    assert (last.finish_reason != "error") == ok
    if not ok:
        assert last.status == 400
