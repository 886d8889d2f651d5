"""Supervised finetuning data: conversations → token ids + labels that train only the assistant's turns.

Accepted inputs (seed-spec §8.1), one file or several:
- the seed's JSON list: `[{"id", "conversations": [{"from": "human"|"gpt"|"system", "value"}...], "instruction"}]`
- JSONL with one such record per line;
- OpenAI-style records `{"messages": [{"role": "system"|"user"|"assistant", "content"}...]}` (list or JSONL).
A non-empty `instruction` becomes the system message. As in the Aquila2 script, turns before the first human
turn (other than a system turn) are dropped.

Rendering goes through `tianying.templates.render_chat_segments`, the code path chat and serving use, so a
model is trained on exactly the prompts it will be served with. The whole text is tokenized in one piece (never
segment by segment: BPE merges across a segment boundary, which is how the seed's Aquila2 script silently lost
samples, issue FlagAI-Open/Aquila2#97), and a token carries loss iff its LAST byte lies in a trained segment —
an assistant reply or the separator/stop token that ends it. So in `Assistant: Hi` the token ` Hi`, which begins
with the prompt's space, is trained, exactly what the model must emit after the inference prompt
`...Assistant:`. No BOS is added (neither chat nor the Aquila2 SFT script adds one).
Special-token strings inside the data (`</s>` in a reply about HTML, say) are tokenized as the text they are;
only the template's own separators become control tokens (`tianying.templates.mark_content`, as in chat).

Truncation keeps at most `seq_length + 1` tokens (the model sees `seq_length` inputs) and never cuts inside a
UTF-8 character that byte-level BPE split over several tokens.

Other formats (issue 19): ShareGPT variants (`from`/`value` with human/gpt/system/tool/observation/function_call
roles, or `role`/`content`), OpenAI content parts, Alpaca (`instruction`/`input`/`output`, optional
`system`/`history`), `prompt`/`completion` text, preference records (`record_preference`), parquet files, a
`datasets.save_to_disk` directory, and a folder of such files; `columns` maps a dataset's column names to ours.

Packing (`pack_examples`) concatenates several conversations into one row of up to `seq_length + 1` tokens
and keeps their boundaries. With isolation (`collate_sft(doc_ids=True)`, the finetune recipe's default when
packing) the model attends block-diagonally and restarts positions per conversation, so a packed row computes
exactly the per-conversation losses the conversations would give alone; without it a conversation sees the
ones before it in its row (as documents do in plain pretraining packing). Either way no label crosses a
boundary (the first token of each conversation is never a target) and only assistant tokens are targets.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tianying.errors import TianyingError

IGNORE = -100
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SFTDataError(TianyingError):
    """A malformed SFT file or record; the message names the file and the record id."""


@dataclass
class SFTExample:
    id: str
    input_ids: list[int]
    labels: list[int]  # labels[t] = input_ids[t] where token t is trained, else -100 (not yet shifted)
    truncated: bool = False
    segments: list[int] | None = None  # a packed row: the lengths of its samples, in order

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class SFTStats:
    records: int = 0
    skipped_bad: int = 0
    skipped_empty: int = 0  # nothing left to train after truncation (the prompt alone fills seq_length)
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    errors: list[str] = field(default_factory=list)  # the first few skipped-record messages

    def summary(self) -> str:
        s = (f"{self.records} conversations, {self.tokens} tokens ({self.trained_tokens} trained); "
             f"{self.truncated} truncated")
        if self.skipped_bad:
            s += f", {self.skipped_bad} malformed skipped"
        if self.skipped_empty:
            s += f", {self.skipped_empty} skipped (no assistant token within seq_length)"
        return s


# ----------------------------------------------------------------------------------------------- reading
def read_records(path: str | Path, skip_bad: bool = False, stats: SFTStats | None = None,
                 split: str | None = None) -> Iterator[tuple[str, object]]:
    """(record id, raw record) pairs from a JSON list, a JSONL file, a parquet file, a directory saved by
    `datasets` (`save_to_disk`; a DatasetDict gives its `split`, default train) or a directory of such files.
    Ids default to `#N` / `line N`."""
    path = Path(path)
    if path.is_dir():
        yield from _read_dir(path, skip_bad, stats, split)
        return
    if not path.is_file():
        raise SFTDataError(f"data file {path} not found")
    if path.suffix == ".parquet":
        yield from _read_table(path, _parquet_rows(path))
        return
    text = path.read_text(encoding="utf-8-sig")
    head = text.lstrip()[:1]
    if head == "[":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise SFTDataError(f"{path}: not valid JSON ({e})") from None
        for i, rec in enumerate(items):
            yield _record_id(rec, f"#{i}"), rec
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            msg = f"{path}: line {n} is not valid JSON ({e.msg} at column {e.colno})"
            if not skip_bad:
                raise SFTDataError(msg + "; pass --skip-bad to skip such records") from None
            if stats is not None:
                stats.skipped_bad += 1
                stats.errors.append(msg)
            continue
        yield _record_id(rec, f"line {n}"), rec


def _parquet_rows(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SFTDataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        raise SFTDataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None


def _read_table(where: Path, rows: Sequence[dict]) -> Iterator[tuple[str, object]]:
    for i, rec in enumerate(rows):
        yield _record_id(rec, f"#{i}"), rec


def _read_dir(path: Path, skip_bad: bool, stats: SFTStats | None, split: str | None
              ) -> Iterator[tuple[str, object]]:
    """A `datasets.save_to_disk` directory (Arrow shards + state.json), a DatasetDict of those, or a folder
    of .json/.jsonl/.parquet files (read in name order)."""
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        try:
            import datasets
        except ImportError:
            raise SFTDataError(f"{path}: a `datasets` directory needs the datasets package") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            want = split or ("train" if "train" in ds else next(iter(ds)))
            if want not in ds:
                raise SFTDataError(f"{path}: no split {want!r}; it has {', '.join(ds)}")
            ds = ds[want]
        yield from _read_table(path, ds.to_list())
        return
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".parquet"))
    if not files:
        raise SFTDataError(f"{path}: no .json, .jsonl or .parquet files and not a `datasets` directory")
    for f in files:
        for rid, rec in read_records(f, skip_bad, stats):
            yield f"{f.name}:{rid}", rec


def _record_id(rec: object, default: str) -> str:
    if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)):
        return str(rec["id"])
    return default


def map_columns(rec: object, columns: dict[str, str] | None) -> object:
    """The record with its columns renamed to ours: `columns` maps our name → the dataset's
    (e.g. {"prompt": "question", "chosen": "good"}); a mapped column that is missing is left missing."""
    if not columns or not isinstance(rec, dict):
        return rec
    out = {k: v for k, v in rec.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs in rec:
            out[ours] = rec[theirs]
    return out


def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """`prompt=question,chosen=good` (or a mapping) → {"prompt": "question", "chosen": "good"}."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return {str(k): str(v) for k, v in spec.items()}
    out = {}
    for part in str(spec).split(","):
        ours, sep, theirs = part.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise SFTDataError(f"column mapping {part!r}: expected OURS=THEIRS, e.g. prompt=question")
        out[ours.strip()] = theirs.strip()
    return out


# ShareGPT's tool turns (function_call / observation, LLaMA-Factory's names) fit the two-role templates as the
# turns they answer: a call is the assistant speaking, a tool's result is input the model reads
_ROLES.update({"tool": "user", "observation": "user", "function": "user", "ipython": "user",
               "function_call": "assistant"})


def record_messages(rec: object) -> list[dict[str, str]]:
    """Validate one SFT record and return its messages as [{"role", "content"}]; raises ValueError(problem).

    Accepts the seed's / ShareGPT `conversations` (from/value or role/content), OpenAI `messages`, Alpaca
    (`instruction`, optional `input`, `output`, `system`, `history` [[q, a], ...]) and prompt/completion text.
    """
    if not isinstance(rec, dict):
        raise ValueError(f"is a {type(rec).__name__}, expected an object with 'conversations' or 'messages'")
    if "conversations" not in rec and "messages" not in rec:
        if "output" in rec and "instruction" in rec:
            return _alpaca_messages(rec, rec["output"], "output")
        if "prompt" in rec and ("completion" in rec or "response" in rec):
            key = "completion" if "completion" in rec else "response"
            return _prompt_messages(rec) + [_reply(rec[key], key)]
    return _turn_messages(rec, require_reply=True)


def _turn_messages(rec: dict, require_reply: bool) -> list[dict[str, str]]:
    if "conversations" in rec:
        turns, role_key, text_key, field_name = rec["conversations"], "from", "value", "conversations"
    elif "messages" in rec:
        turns, role_key, text_key, field_name = rec["messages"], "role", "content", "messages"
    else:
        raise ValueError("has neither 'conversations' nor 'messages' (nor Alpaca 'instruction'/'output', nor "
                         "'prompt' with 'completion' or 'chosen'/'rejected')")
    if not isinstance(turns, list):
        raise ValueError(f"'{field_name}' is a {type(turns).__name__}, expected a list")
    if not turns:
        raise ValueError(f"'{field_name}' is empty")
    messages: list[dict[str, str]] = []
    instruction = rec.get("instruction", rec.get("system", ""))
    if instruction not in (None, ""):
        if not isinstance(instruction, str):
            raise ValueError(f"'instruction' is a {type(instruction).__name__}, expected a string")
        messages.append({"role": "system", "content": instruction})
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {k} is a {type(turn).__name__}, expected an object")
        raw_role = turn.get(role_key, turn.get("role", turn.get("from")))
        role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise ValueError(f"turn {k} has role {raw_role!r}; expected human/gpt/system/tool "
                             "(or user/assistant)")
        content = _text(turn.get(text_key, turn.get("content", turn.get("value"))))
        if not isinstance(content, str):
            raise ValueError(f"turn {k} ({raw_role}) has no string '{text_key}'")
        if role == "system":
            if messages or k != 0:
                raise ValueError(f"turn {k} is a system turn; only the first turn may be one")
            messages.append({"role": "system", "content": content})
            continue
        chat = [m for m in messages if m["role"] != "system"]
        if not chat and role == "assistant":
            continue  # the Aquila2 script drops a leading non-human turn
        expected = "user" if len(chat) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"turn {k} is from the {role} but the {expected} was expected "
                             "(turns must alternate human, gpt, human, ...)")
        messages.append({"role": role, "content": content})
    if require_reply and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("has no assistant (gpt) turn to learn from")
    return messages


def _text(content: object) -> object:
    """OpenAI content parts [{"type": "text", "text": ...}] → their text; anything else unchanged."""
    if isinstance(content, list) and content and all(isinstance(p, dict) and p.get("type") == "text"
                                                     for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return content


def _alpaca_messages(rec: dict, reply: object, key: str) -> list[dict[str, str]]:
    """Alpaca: user = instruction, then a newline and `input` when there is one (LLaMA-Factory's joining)."""
    inst, extra = rec.get("instruction"), rec.get("input") or ""
    if not isinstance(inst, str) or not inst:
        raise ValueError("'instruction' must be a non-empty string")
    if not isinstance(extra, str):
        raise ValueError(f"'input' is a {type(extra).__name__}, expected a string")
    messages = []
    system = rec.get("system") or ""
    if not isinstance(system, str):
        raise ValueError(f"'system' is a {type(system).__name__}, expected a string")
    if system:
        messages.append({"role": "system", "content": system})
    history = rec.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2
                                                and all(isinstance(x, str) for x in h) for h in history):
        raise ValueError("'history' must be a list of [question, answer] string pairs")
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": inst + ("\n" + extra if extra else "")})
    if reply is not None:
        messages.append(_reply(reply, key))
    return messages


def _prompt_messages(rec: dict) -> list[dict[str, str]]:
    """The prompt of a prompt/completion or preference record: a string (one user turn) or messages."""
    prompt = rec.get("prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("'prompt' is empty")
        system = rec.get("system") or ""
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        messages = _turn_messages({"messages": prompt, "system": rec.get("system")}, require_reply=False)
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("'prompt' must end with a user turn")
        return messages
    raise ValueError(f"'prompt' is a {type(prompt).__name__}, expected a string or a list of messages")


def _reply(value: object, key: str) -> dict[str, str]:
    """A reply given as text, one message ({"role"/"from", "content"/"value"}) or a list of one message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", value.get("from", "assistant"))
        if _ROLES.get(role) != "assistant":
            raise ValueError(f"'{key}' is a {role!r} message, expected the assistant's")
        value = _text(value.get("content", value.get("value")))
    if not isinstance(value, str):
        raise ValueError(f"'{key}' has no reply text (expected a string or one assistant message)")
    return {"role": "assistant", "content": value}


def record_preference(rec: object) -> tuple[list[dict[str, str]], dict[str, str], dict[str, str]]:
    """(prompt messages, chosen reply, rejected reply) of one preference record; raises ValueError(problem).

    Forms: {"prompt": text or messages, "chosen", "rejected"} (TRL's, replies as text or a one-message list);
    {"conversations" or "messages": prompt turns, "chosen", "rejected"} (ShareGPT-style, replies as text or a
    {"from": "gpt", "value"} message); Alpaca {"instruction", "input", "chosen", "rejected"}. When `chosen` and
    `rejected` are whole conversations that share the prompt (Anthropic HH style), the shared turns are the
    prompt.
    """
    if not isinstance(rec, dict):
        raise ValueError(f"is a {type(rec).__name__}, expected an object with 'chosen' and 'rejected'")
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise ValueError(f"has no '{key}' reply")
    chosen, rejected = rec["chosen"], rec["rejected"]
    if ("prompt" not in rec and "conversations" not in rec and "messages" not in rec and "instruction" not in rec
            and isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1):
        c = _turn_messages({"messages": chosen}, True)
        r = _turn_messages({"messages": rejected}, True)
        if c[:-1] != r[:-1] or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            raise ValueError("'chosen' and 'rejected' conversations must differ only in their last reply")
        return c[:-1], c[-1], r[-1]
    if "prompt" in rec:
        prompt = _prompt_messages(rec)
    elif "conversations" in rec or "messages" in rec:
        prompt = _turn_messages(rec, require_reply=False)
        if not prompt or prompt[-1]["role"] != "user":
            raise ValueError("the prompt turns must end with a human/user turn")
    elif "instruction" in rec:
        prompt = _alpaca_messages(rec, None, "")
    else:
        raise ValueError("has no prompt ('prompt', 'conversations', 'messages' or 'instruction')")
    c, r = _reply(chosen, "chosen"), _reply(rejected, "rejected")
    if c["content"] == r["content"]:
        raise ValueError("'chosen' and 'rejected' are the same reply")
    return prompt, c, r


# ----------------------------------------------------------------------------------------------- encoding
def encode_conversation(messages: Sequence[dict[str, str]], tokenizer, template,
                        max_tokens: int | None = None, last_reply_only: bool = False
                        ) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): the rendered conversation and its assistant-only labels.

    `last_reply_only` trains only the final assistant reply (a preference pair's chosen/rejected one; earlier
    assistant turns are part of the prompt).

    `template` is a name, a Jinja file or a template object. `tokenizer` needs `encode(text) -> ids` and
    `token_bytes(id) -> bytes`, and `special_tokens` + `encode_plain` (what `Tokenizer` provides) so that
    special-token strings inside the data are trained as the text they are, not as control tokens.
    """
    from tianying.templates import encode_marked, mark_content, render_chat_segments, unmark

    marked = render_chat_segments(mark_content(list(messages), tokenizer), template, add_generation_prompt=False)
    if last_reply_only:
        last = max((i for i, (_, t) in enumerate(marked) if t), default=-1)
        marked = [(s, t and i == last) for i, (s, t) in enumerate(marked)]
    segments = [(unmark(s), t) for s, t in marked]
    text = "".join(s for s, _ in segments)
    trained = bytearray()
    for s, t in segments:
        trained.extend((b"\x01" if t else b"\x00") * len(s.encode("utf-8")))
    data = text.encode("utf-8")
    ids = encode_marked(tokenizer, "".join(s for s, _ in marked))
    ends, pos = [], 0
    for i in ids:
        pos += len(tokenizer.token_bytes(i))
        ends.append(pos)
    if pos != len(data):
        raise SFTDataError(f"the tokenizer's tokens cover {pos} bytes of a {len(data)}-byte text; SFT label "
                           "masking needs a byte-level tokenizer whose tokens concatenate to the text")
    labels = [i if trained[e - 1] else IGNORE for i, e in zip(ids, ends)]
    truncated = False
    if max_tokens is not None and len(ids) > max_tokens:
        cut = max_tokens
        while cut > 0 and 0x80 <= data[ends[cut - 1]] < 0xC0:  # the cut would land inside a character
            cut -= 1
        ids, labels, truncated = ids[:cut], labels[:cut], True
    return ids, labels, truncated


def bad_record(stats: SFTStats, msg: str, skip_bad: bool) -> None:
    """A malformed record: one clear error, or (with --skip-bad) counted and remembered for the summary."""
    if not skip_bad:
        raise SFTDataError(msg + "; pass --skip-bad to skip such records")
    stats.skipped_bad += 1
    if len(stats.errors) < 20:
        stats.errors.append(msg)

def load_sft(paths: str | Path | Sequence[str | Path], tokenizer, template, seq_length: int,
             skip_bad: bool = False, limit: int | None = None, columns: dict[str, str] | None = None,
             split: str | None = None) -> tuple[list[SFTExample], SFTStats]:
    """Read, validate, render and tokenize every record; malformed ones raise SFTDataError (or are counted).

    `columns` renames dataset columns to ours first (see `map_columns`); `split` picks a DatasetDict's split.
    """
    from tianying.templates import TemplateError

    if isinstance(paths, (str, Path)):
        paths = [paths]
    stats = SFTStats()
    out: list[SFTExample] = []
    for path in paths:
        for rid, rec in read_records(path, skip_bad, stats, split):
            try:
                messages = record_messages(map_columns(rec, columns))
                ids, labels, truncated = encode_conversation(messages, tokenizer, template, seq_length + 1)
            except (ValueError, TemplateError) as e:
                bad_record(stats, f"{path}: record {rid}: {e}", skip_bad)
                continue
            ex = SFTExample(rid, ids, labels, truncated)
            if ex.n_trained == 0:
                stats.skipped_empty += 1
                continue
            stats.records += 1
            stats.truncated += truncated
            stats.tokens += len(ids)
            stats.trained_tokens += ex.n_trained
            out.append(ex)
            if limit is not None and len(out) >= limit:
                return out, stats
    if not out:
        raise SFTDataError(f"no usable conversations in {', '.join(map(str, paths))} ({stats.summary()})")
    return out, stats


# ----------------------------------------------------------------------------------------------- batching
def pack_examples(examples: Sequence[SFTExample], max_tokens: int) -> list[SFTExample]:
    """Greedy first-fit packing, in order, into rows of at most `max_tokens` (see the module docstring).

    Each row records its samples' lengths (`segments`), from which `collate_sft(doc_ids=True)` builds the
    per-token sample ids that isolate them (block-diagonal attention, positions restarting per sample)."""
    rows: list[SFTExample] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_names: list[str] = []
    cur_lens: list[int] = []
    for ex in examples:
        if cur_ids and len(cur_ids) + len(ex) > max_tokens:
            rows.append(SFTExample("+".join(cur_names), cur_ids, cur_labels, segments=cur_lens))
            cur_ids, cur_labels, cur_names, cur_lens = [], [], [], []
        cur_ids = cur_ids + ex.input_ids
        cur_labels = cur_labels + [IGNORE] + ex.labels[1:]  # never predict a conversation's first token
        cur_names.append(ex.id)
        cur_lens.append(len(ex))
    if cur_ids:
        rows.append(SFTExample("+".join(cur_names), cur_ids, cur_labels, segments=cur_lens))
    return rows


def collate_sft(examples: Sequence[SFTExample], pad_id: int = 0, doc_ids: bool = False):  # noqa: ANN201
    """Right-pad to the longest row → (input_ids [B, T], labels [B, T]) with labels aligned to positions, and with
    `doc_ids` a third tensor [B, T]: the sample index of each token of a packed row (-1 on padding), for the
    model's isolated (block-diagonal) attention.

    Right padding needs no attention mask: under the causal mask real tokens never see the pads after them,
    and pads carry no labels.
    """
    n = max(len(e) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    docs = torch.full((len(examples), n), -1, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, :len(e)] = torch.tensor(e.input_ids)
        labels[b, :len(e)] = torch.tensor(e.labels)
        lens = e.segments or [len(e)]
        docs[b, :len(e)] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    if doc_ids:
        return ids[:, :-1].contiguous(), labels[:, 1:].contiguous(), docs[:, :-1].contiguous()
    return ids[:, :-1].contiguous(), labels[:, 1:].contiguous()
