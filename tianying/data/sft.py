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

Packing (`pack_examples`) concatenates several conversations into one row of up to `seq_length + 1` tokens.
The model has no block-diagonal attention mask, so a packed conversation CAN attend to the ones before it in
its row (as documents do in pretraining) and positions continue across it; what packing guarantees is that no
label crosses a boundary (the first token of each conversation is never a target) and that only assistant
tokens are targets. It trades this mild context leakage for far less padding on short chat data.
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
def read_records(path: str | Path, skip_bad: bool = False, stats: SFTStats | None = None
                 ) -> Iterator[tuple[str, object]]:
    """(record id, raw record) pairs from a JSON list or a JSONL file; ids default to `#N` / `line N`."""
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"SFT data file {path} not found")
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


def _record_id(rec: object, default: str) -> str:
    if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)):
        return str(rec["id"])
    return default


def record_messages(rec: object) -> list[dict[str, str]]:
    """Validate one record and return its messages as [{"role", "content"}]; raises ValueError(problem)."""
    if not isinstance(rec, dict):
        raise ValueError(f"is a {type(rec).__name__}, expected an object with 'conversations' or 'messages'")
    if "conversations" in rec:
        turns, role_key, text_key, field_name = rec["conversations"], "from", "value", "conversations"
    elif "messages" in rec:
        turns, role_key, text_key, field_name = rec["messages"], "role", "content", "messages"
    else:
        raise ValueError("has neither 'conversations' nor 'messages'")
    if not isinstance(turns, list):
        raise ValueError(f"'{field_name}' is a {type(turns).__name__}, expected a list")
    if not turns:
        raise ValueError(f"'{field_name}' is empty")
    messages: list[dict[str, str]] = []
    instruction = rec.get("instruction", "")
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
            raise ValueError(f"turn {k} has role {raw_role!r}; expected human/gpt/system (or user/assistant)")
        content = turn.get(text_key, turn.get("content", turn.get("value")))
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
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("has no assistant (gpt) turn to learn from")
    return messages


# ----------------------------------------------------------------------------------------------- encoding
def encode_conversation(messages: Sequence[dict[str, str]], tokenizer, template,
                        max_tokens: int | None = None) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): the rendered conversation and its assistant-only labels.

    `template` is a name, a Jinja file or a template object. `tokenizer` needs `encode(text) -> ids` and
    `token_bytes(id) -> bytes`, and `special_tokens` + `encode_plain` (what `Tokenizer` provides) so that
    special-token strings inside the data are trained as the text they are, not as control tokens.
    """
    from tianying.templates import encode_marked, mark_content, render_chat_segments, unmark

    marked = render_chat_segments(mark_content(list(messages), tokenizer), template, add_generation_prompt=False)
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


def load_sft(paths: str | Path | Sequence[str | Path], tokenizer, template, seq_length: int,
             skip_bad: bool = False, limit: int | None = None) -> tuple[list[SFTExample], SFTStats]:
    """Read, validate, render and tokenize every record; malformed ones raise SFTDataError (or are counted)."""
    from tianying.templates import TemplateError

    if isinstance(paths, (str, Path)):
        paths = [paths]
    stats = SFTStats()
    out: list[SFTExample] = []
    for path in paths:
        for rid, rec in read_records(path, skip_bad, stats):
            try:
                messages = record_messages(rec)
                ids, labels, truncated = encode_conversation(messages, tokenizer, template, seq_length + 1)
            except (ValueError, TemplateError) as e:
                msg = f"{path}: record {rid}: {e}"
                if not skip_bad:
                    raise SFTDataError(msg + "; pass --skip-bad to skip such records") from None
                stats.skipped_bad += 1
                if len(stats.errors) < 20:
                    stats.errors.append(msg)
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
    """Greedy first-fit packing, in order, into rows of at most `max_tokens` (see the module docstring)."""
    rows: list[SFTExample] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_names: list[str] = []
    for ex in examples:
        if cur_ids and len(cur_ids) + len(ex) > max_tokens:
            rows.append(SFTExample("+".join(cur_names), cur_ids, cur_labels))
            cur_ids, cur_labels, cur_names = [], [], []
        cur_ids = cur_ids + ex.input_ids
        cur_labels = cur_labels + [IGNORE] + ex.labels[1:]  # never predict a conversation's first token
        cur_names.append(ex.id)
    if cur_ids:
        rows.append(SFTExample("+".join(cur_names), cur_ids, cur_labels))
    return rows


def collate_sft(examples: Sequence[SFTExample], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row → (input_ids [B, T], labels [B, T]) with labels aligned to positions.

    Right padding needs no attention mask: under the causal mask real tokens never see the pads after them,
    and pads carry no labels.
    """
    n = max(len(e) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, :len(e)] = torch.tensor(e.input_ids)
        labels[b, :len(e)] = torch.tensor(e.labels)
    return ids[:, :-1].contiguous(), labels[:, 1:].contiguous()
