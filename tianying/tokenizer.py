"""Aquila's tokenizer: GPT-2-style byte-level BPE plus 8 appended special tokens.

Layout (seed-spec §3): id 0 `<|endoftext|>` (unk, pad), ids 1..256 the 256 byte symbols in GPT-2 byte order,
then one id per merge, then `<|startofpiece|>`, `<|endofpiece|>`, `<|LDWANG|>`, `[MASK]`, `[gMASK]`,
`[sMASK]`, `[CLS]` (BOS), `</s>` (EOS) at base+0..base+7 (100000..100007 for the real vocab). The GPT-2
pre-tokenizer regex, no prefix space, no normalisation; `encode()` adds BOS/EOS only when asked (the HF
Aquila2 behaviour). Special tokens are matched as whole strings anywhere in the text.

The BPE itself runs in the `tokenizers` library; this module only wires it up the Aquila way and guards the
one silent trap of the original: without `special_tokens_map.json`, FlagAI resolved BOS/EOS to id 0.

Other LLaMA-family tokenizers (a `tokenizer.json` with its own special tokens, wherever they sit, and BOS/EOS
named in tokenizer_config.json) load as they are. The Aquila repairs — appending the 8 specials when no file
lists them, defaulting BOS/EOS to `[CLS]`/`</s>` — apply only to files that are recognisably Aquila's: a
vocabulary whose id 0 is `<|endoftext|>` and that declares no other added or special token.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path

from tianying.errors import TianyingError

ENDOFTEXT = "<|endoftext|>"
# appended after the base vocab, in this order (seed-spec §3.2)
AQUILA_SPECIALS = ("<|startofpiece|>", "<|endofpiece|>", "<|LDWANG|>", "[MASK]", "[gMASK]", "[sMASK]",
                   "[CLS]", "</s>")
AQUILA_ROLES = {"bos": "[CLS]", "eos": "</s>", "unk": ENDOFTEXT, "pad": ENDOFTEXT}
MERGES_HEADER = "#version: 0.2 - Trained by huggingface/tokenizers"


class TokenizerError(TianyingError):
    """Missing, corrupt or inconsistent tokenizer files."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (so BPE never sees whitespace or control bytes).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100.. in byte order. Iterating the
    dict gives the "GPT-2 byte order" that ids 1..256 of Aquila's vocab follow.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror})") from None


def _token_content(value: object) -> str | None:
    """special_tokens_map.json / tokenizer_config.json store a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class Tokenizer:
    """Byte-level BPE with Aquila's special tokens; load with `Tokenizer.from_dir`."""

    def __init__(self, backend, special_tokens: dict[str, int], roles: dict[str, str | None], base_vocab_size: int):
        self._tok = backend  # tokenizers.Tokenizer
        self.special_tokens: dict[str, int] = dict(special_tokens)
        self._roles = dict(roles)
        self.base_vocab_size = base_vocab_size
        self.bos_id = self._role_id("bos")
        self.eos_id = self._role_id("eos")
        self.unk_id = self._role_id("unk")
        self.pad_id = self._role_id("pad")

    def _role_id(self, role: str) -> int | None:
        tok = self._roles.get(role)
        if tok is None:  # a non-Aquila tokenizer need not have every role (many have no unk or pad)
            return None
        i = self._tok.token_to_id(tok)
        if i is None:
            raise TokenizerError(f"{role} token {tok!r} is not in the vocabulary")
        return i

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a HF-style directory: tokenizer.json if present, else vocab.json + merges.txt.

        added_tokens.json, tokenizer_config.json (added_tokens_decoder) and special_tokens_map.json are read when
        present. Missing special-token files are not fatal: the standard 8 Aquila specials are appended after the
        base vocab and BOS/EOS become `[CLS]`/`</s>`, with a warning (never the id-0 fallback FlagAI had).
        """
        from tokenizers import Tokenizer as Backend

        d = Path(path)
        if not d.is_dir():
            raise TokenizerError(f"{d}: not a tokenizer directory" if d.exists() else f"{d}: no such directory")
        tj = d / "tokenizer.json"
        if tj.is_file():
            try:
                backend = Backend.from_file(str(tj))
            except Exception as e:  # tokenizers raises a bare Exception for parse errors
                raise TokenizerError(f"{tj}: corrupt tokenizer.json ({_one_line(e)})") from None
            if type(backend.model).__name__ != "BPE":
                raise TokenizerError(f"{tj}: expected a BPE model, found {type(backend.model).__name__}")
        else:
            vocab_file, merges_file = d / "vocab.json", d / "merges.txt"
            for f in (vocab_file, merges_file):
                if not f.is_file():
                    raise TokenizerError(f"{d}: no tokenizer.json and no {f.name}")
            vocab = _read_json(vocab_file)
            if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
                raise TokenizerError(f"{vocab_file}: expected a JSON object token -> id")
            merges = _read_merges(merges_file)
            backend = _new_backend(vocab, merges)

        # the base vocab is the BPE model's own; anything beyond it is an added token. tokenizer.json's own
        # added tokens may also sit inside it (a `tokenizers` BPE trained with special_tokens puts them at 0..k)
        base = backend.get_vocab_size(with_added_tokens=False)
        existing = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}

        declared: dict[str, int] = {}
        config_file = d / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_file}: expected a JSON object")
        for i, entry in (config.get("added_tokens_decoder") or {}).items():
            tok = _token_content(entry)
            if tok is not None:
                declared[tok] = int(i)
        added_file = d / "added_tokens.json"
        if added_file.is_file():
            added = _read_json(added_file)
            if not isinstance(added, dict) or not all(isinstance(v, int) for v in added.values()):
                raise TokenizerError(f"{added_file}: expected a JSON object token -> id")
            declared.update(added)
        declared.update(existing)

        aquila = backend.token_to_id(ENDOFTEXT) == 0 and set(declared) <= {ENDOFTEXT}
        if aquila:
            warnings.warn(f"{d}: no added_tokens.json, tokenizer_config.json or tokenizer.json lists the added "
                          f"tokens; appending the 8 standard Aquila special tokens at ids {base}..{base + 7}",
                          stacklevel=2)
            declared = {t: base + k for k, t in enumerate(AQUILA_SPECIALS)}
        _add_specials(backend, declared, base, d)

        aquila = aquila or backend.token_to_id(ENDOFTEXT) == 0 and AQUILA_SPECIALS[-1] in declared
        roles = _resolve_roles(d, config, backend, aquila)
        specials = {t: i for t, i in backend.get_vocab(with_added_tokens=True).items() if i >= base}
        specials.update({t: i for t, i in declared.items() if i < base})
        if aquila and backend.token_to_id(ENDOFTEXT) is not None:
            specials[ENDOFTEXT] = backend.token_to_id(ENDOFTEXT)
        specials = dict(sorted(specials.items(), key=lambda kv: kv[1]))
        return cls(backend, specials, roles, base)

    # ------------------------------------------------------------------ vocabulary
    @property
    def backend(self):  # noqa: ANN201 - tokenizers.Tokenizer
        """The `tokenizers` object underneath (for libraries that take one, e.g. constrained decoding)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids including the added special tokens (100008 for the real Aquila tokenizer)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; BOS (`[CLS]`) / EOS (`</s>`) only when asked, as HF Aquila2 does."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        ids = self._tok.encode(valid_unicode(text), add_special_tokens=False).ids
        return self._bos(bos) + ids + self._eos(eos)

    def _bos(self, want: bool) -> list[int]:
        if want and self.bos_id is None:
            raise TokenizerError("this tokenizer has no BOS token (tokenizer_config.json names none)")
        return [self.bos_id] if want else []

    def _eos(self, want: bool) -> list[int]:
        if want and self.eos_id is None:
            raise TokenizerError("this tokenizer has no EOS token (tokenizer_config.json names none)")
        return [self.eos_id] if want else []

    def encode_plain(self, text: str) -> list[int]:
        """Ids of `text` with special-token strings in it read as plain text (user content inside a chat).

        `encode(add_special_tokens=False)` of `tokenizers` still matches added tokens, so this runs the
        normaliser, pre-tokenizer and BPE model directly, as transformers' `_encode_without_added_tokens` does.
        """
        tok = self._tok
        text = valid_unicode(text)
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        splits = [s for s, _ in tok.pre_tokenizer.pre_tokenize_str(text)] if tok.pre_tokenizer is not None else [text]
        return [t.id for s in splits for t in tok.model.tokenize(s)]

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """`encode` over many texts, in parallel threads inside `tokenizers`."""
        out = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        if bos or eos:
            out = [self._bos(bos) + ids + self._eos(eos) for ids in out]
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD, like `errors='replace'`."""
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise TokenizerError(f"token id {bad[0]} out of range for a vocabulary of {n}")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @cached_property
    def _token_bytes(self) -> list[bytes | None]:
        """id -> raw bytes for BPE tokens; None for special tokens (they decode to their own text)."""
        out: list[bytes | None] = [None] * self.vocab_size
        specials = set(self.special_tokens.values())
        byte_level = [d.get("type") for d in self._decoder_steps] == ["ByteLevel"]
        for tok, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i not in specials:
                out[i] = bytes(BYTE_DECODER[c] for c in tok) if byte_level else _piece_bytes(tok)
        return out

    @cached_property
    def _decoder_steps(self) -> list[dict]:
        """The backend decoder's steps, e.g. [ByteLevel] (GPT-2, Aquila) or [Replace, ByteFallback, Fuse,
        Strip] (LLaMA-2-style SentencePiece BPE), as tokenizer.json spells them."""
        dec = json.loads(self._tok.decoder.__getstate__()) if self._tok.decoder is not None else {}
        return dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]

    def token_bytes(self, i: int) -> bytes:
        """Raw bytes a token stands for (special tokens: their UTF-8 text)."""
        b = self._token_bytes[i]
        return b if b is not None else self._tok.id_to_token(i).encode("utf-8")

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """An incremental decoder for generation: `.add(id)` returns only complete characters."""
        return StreamDecoder(self, skip_special_tokens)

    # ------------------------------------------------------------------ saving
    def save(self, directory: str | os.PathLike, chat_template: str | None = None) -> None:
        """Write an HF directory that our `from_dir` and transformers' AutoTokenizer/GPT2Tokenizer both load.

        `chat_template`: a Jinja source (`tianying.templates.jinja_source(name)`) for tokenizer_config.json.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self._tok.model.save(tmp)
            vocab = json.loads(Path(tmp, "vocab.json").read_text(encoding="utf-8"))
            merges = Path(tmp, "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
        # our own layout: sorted by id, one line per merge, the header HF writes
        vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
        _write(d / "vocab.json", json.dumps(vocab, ensure_ascii=False))
        _write(d / "merges.txt", "\n".join([MERGES_HEADER, *merges]) + "\n")
        _write(d / "tokenizer.json", self._tok.to_str(pretty=False))
        role_map = {f"{r}_token": self._roles[r] for r in ("bos", "eos", "unk", "pad") if self._roles.get(r)}
        # the {"content": ...} form: FlagAI 1.8.4 reads only that one; transformers reads both
        entry_map = {k: {"content": v, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
                     for k, v in role_map.items()}
        _write(d / "special_tokens_map.json", json.dumps(entry_map, ensure_ascii=False, indent=2))
        added = {t: i for t, i in self.special_tokens.items() if i >= self.base_vocab_size}
        _write(d / "added_tokens.json", json.dumps(added, ensure_ascii=False, indent=2))
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": 2048,
            "add_prefix_space": False,
            "add_bos_token": False,
            "add_eos_token": False,
            # false (HF Aquila2 ships true): clean-up would turn "a ." into "a." and break decode(encode(x)) == x
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "padding_side": "right",
            **role_map,
            "added_tokens_decoder": {
                str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
                for t, i in self.special_tokens.items()
            },
            **({"chat_template": chat_template} if chat_template else {}),
        }
        _write(d / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2))

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"unk={self.unk_id}, pad={self.pad_id})")

    def __len__(self) -> int:
        return self.vocab_size


def valid_unicode(text: str) -> str:
    """`text` with lone surrogates (invalid Unicode: from undecodable bytes in argv, or `\\ud800` escapes in JSON)
    replaced by U+FFFD, with one warning; `tokenizers` would refuse the whole string."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        warnings.warn("the text holds invalid Unicode (lone surrogates); they were replaced by U+FFFD",
                      stacklevel=3)
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


class StreamDecoder:
    """Turns a stream of token ids into text without ever emitting half a UTF-8 character.

    A Chinese character or emoji is often split over 2-4 byte tokens; decoding each token alone would print
    U+FFFD. Tokens are mapped to their raw bytes and fed to an incremental UTF-8 decoder, which holds back an
    incomplete tail until the next token completes it. The concatenated output equals `Tokenizer.decode`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tk = tokenizer
        self._skip = skip_special_tokens
        self._specials = set(tokenizer.special_tokens.values())
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # SentencePiece decoders end with Strip(" ", 1): the fused text loses the space its first "▁" gave it
        self._strip = next((int(d.get("start", 0)) for d in tokenizer._decoder_steps if d.get("type") == "Strip"), 0)

    def add(self, token_id: int) -> str:
        """Feed one id; return the text that is now complete (possibly "")."""
        token_id = int(token_id)
        if not 0 <= token_id < self._tk.vocab_size:
            raise TokenizerError(f"token id {token_id} out of range for a vocabulary of {self._tk.vocab_size}")
        if token_id in self._specials:
            # a special token ends any pending partial character, as it does in decode()
            head = self._utf8.decode(b"", final=True)
            self._utf8.reset()
            return self._lstrip(head if self._skip else head + self._tk.id_to_token(token_id))
        return self._lstrip(self._utf8.decode(self._tk.token_bytes(token_id)))

    def _lstrip(self, text: str) -> str:
        if self._strip and text:
            n = min(self._strip, len(text) - len(text.lstrip(" ")))
            text, self._strip = text[n:], 0
        return text

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


# ---------------------------------------------------------------------- helpers
def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read ({_one_line(e)})") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{n}: expected two tokens separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _new_backend(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A `tokenizers` BPE set up exactly like GPT-2: byte-level regex split, no prefix space, no normaliser."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    try:
        model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
    except Exception as e:
        raise TokenizerError(f"vocab.json/merges.txt do not fit together ({_one_line(e)})") from None
    backend = Backend(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_specials(backend, declared: dict[str, int], base: int, d: Path) -> None:
    """Register `declared` tokens as special, checking that each lands on the id the files say."""
    from tokenizers import AddedToken

    def special(t: str) -> AddedToken:
        return AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)

    # ids inside the base vocab (e.g. <|endoftext|> = 0) only need the "special" flag
    for t, i in sorted(declared.items(), key=lambda kv: kv[1]):
        if i < base:
            if backend.token_to_id(t) != i:
                raise TokenizerError(f"{d}: special token {t!r} declared with id {i}, "
                                     f"but the vocabulary has it at {backend.token_to_id(t)}")
        elif backend.token_to_id(t) is None:
            have = backend.get_vocab_size(with_added_tokens=True)
            if i != have:
                raise TokenizerError(f"{d}: added token {t!r} has id {i}, but the next free id is {have} "
                                     "(added token ids must follow the base vocabulary without gaps)")
        backend.add_special_tokens([special(t)])
        if backend.token_to_id(t) != i:
            raise TokenizerError(f"{d}: special token {t!r} should have id {i}, got {backend.token_to_id(t)}")
    if ENDOFTEXT not in declared and backend.token_to_id(ENDOFTEXT) is not None:
        backend.add_special_tokens([special(ENDOFTEXT)])


def _resolve_roles(d: Path, config: dict, backend, aquila: bool = True) -> dict[str, str | None]:
    """bos/eos/unk/pad token strings: special_tokens_map.json > tokenizer_config.json > Aquila defaults.

    v1 ModelHub files name them cls_token/sep_token. A BOS/EOS that would resolve to the unk token (what
    FlagAI silently did without special_tokens_map.json, and what HF Aquila2's tokenizer_config.json alone
    says) is replaced by `[CLS]`/`</s>` with a warning whenever those exist. For a tokenizer that is not
    Aquila's (`aquila=False`) the files say it all: a role they do not name is None.
    """
    roles: dict[str, str] = {}
    map_file = d / "special_tokens_map.json"
    smap = _read_json(map_file) if map_file.is_file() else {}
    if not isinstance(smap, dict):
        raise TokenizerError(f"{map_file}: expected a JSON object")
    for source in (config, smap):
        for role in ("bos", "eos", "unk", "pad"):
            tok = _token_content(source.get(f"{role}_token"))
            if tok is not None:
                roles[role] = tok
        for role, alias in (("bos", "cls_token"), ("eos", "sep_token")):
            tok = _token_content(source.get(alias))
            if tok is not None and f"{role}_token" not in source:
                roles[role] = tok
    missing = [r for r in AQUILA_ROLES if r not in roles]
    if not aquila:
        return {r: roles.get(r) for r in AQUILA_ROLES}
    for r in missing:
        roles[r] = AQUILA_ROLES[r]
    if {"bos", "eos"} & set(missing) and not map_file.is_file():
        warnings.warn(f"{d}: no special_tokens_map.json; using Aquila's bos={roles['bos']} eos={roles['eos']}",
                      stacklevel=3)
    for role in ("bos", "eos"):
        aquila = AQUILA_ROLES[role]
        if roles[role] == roles["unk"] and roles[role] != aquila and backend.token_to_id(aquila) is not None:
            warnings.warn(f"{d}: {role} token {roles[role]!r} is the unk token; using Aquila's {aquila!r} "
                          f"(id {backend.token_to_id(aquila)}) as the models expect", stacklevel=3)
            roles[role] = aquila
    return roles


def _piece_bytes(tok: str) -> bytes:
    """Bytes of a SentencePiece-style token (LLaMA-2 tokenizer.json): `<0xHH>` byte fallback, `▁` a space."""
    if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
        try:
            return bytes([int(tok[3:5], 16)])
        except ValueError:
            pass
    return tok.replace("\u2581", " ").encode("utf-8")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- training
def iter_documents(files: Iterable[str | os.PathLike], with_lang: bool = False) -> Iterator:
    """Documents of JSONL (`{"text": ...}`, optionally .gz) and plain-text files.

    A plain-text file is cut into blocks of whole lines (~64 kB) so newline runs survive, as BPE needs them.
    With `with_lang`, yields (text, lang) where lang is the JSONL "lang" field or None.
    """
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise TokenizerError(f"{p}: no such file")
        name = p.name.removesuffix(".gz")
        opener = gzip.open if p.name.endswith(".gz") else open
        try:
            with opener(p, "rt", encoding="utf-8") as fh:
                if name.endswith((".jsonl", ".json")):
                    for n, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            doc = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise TokenizerError(f"{p}:{n}: not a JSON line ({e.msg})") from None
                        text = doc.get("text") if isinstance(doc, dict) else None
                        if not isinstance(text, str):
                            raise TokenizerError(f'{p}:{n}: expected an object with a "text" string')
                        yield (text, doc.get("lang")) if with_lang else text
                else:
                    block: list[str] = []
                    size = 0
                    for line in fh:
                        block.append(line)
                        size += len(line)
                        if size >= 65536:
                            yield ("".join(block), None) if with_lang else "".join(block)
                            block, size = [], 0
                    if block:
                        yield ("".join(block), None) if with_lang else "".join(block)
        except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
            raise TokenizerError(f"{p}: cannot read ({_one_line(e)})") from None


def train_bpe(files: Iterable[str | os.PathLike] | Iterable[str], vocab_size: int, output_dir: str | os.PathLike,
              *, min_frequency: int = 2, show_progress: bool = False, texts: Iterable[str] | None = None,
              ) -> Tokenizer:
    """Train a byte-level BPE in Aquila's layout and save it to `output_dir`.

    `vocab_size` is the total: 1 (`<|endoftext|>`) + 256 bytes + merges + 8 specials. `texts`, if given, is
    used instead of reading `files` (for callers that sample documents themselves).
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    n_base = vocab_size - len(AQUILA_SPECIALS)
    if n_base < 257:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: need at least {257 + len(AQUILA_SPECIALS)} "
                             "(<|endoftext|>, 256 bytes and 8 special tokens)")
    alphabet = list(BYTE_ENCODER.values())
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=n_base, min_frequency=min_frequency, show_progress=show_progress,
                                  special_tokens=[ENDOFTEXT], initial_alphabet=alphabet, limit_alphabet=256)
    backend.train_from_iterator(texts if texts is not None else iter_documents(files), trainer=trainer)

    with tempfile.TemporaryDirectory() as tmp:
        backend.model.save(tmp)
        trained = json.loads(Path(tmp, "vocab.json").read_text(encoding="utf-8"))
        merges = _read_merges(Path(tmp, "merges.txt"))
    # Aquila's layout: 0 <|endoftext|>, 1..256 bytes in GPT-2 order, then merged tokens in merge order
    vocab = {ENDOFTEXT: 0}
    for c in alphabet:
        vocab[c] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    extra = [t for t in trained if t not in vocab]
    if extra:  # cannot happen with a byte-level alphabet; guard anyway
        raise TokenizerError(f"trained vocabulary has tokens no merge produces: {extra[:5]}")
    if len(vocab) != n_base:
        raise TokenizerError(f"the training text is too small for vocab_size {vocab_size}: it yields only "
                             f"{len(vocab) + len(AQUILA_SPECIALS)} tokens (at min_frequency {min_frequency})")
    out = _new_backend(vocab, merges)
    _add_specials(out, {ENDOFTEXT: 0, **{t: n_base + k for k, t in enumerate(AQUILA_SPECIALS)}}, n_base,
                  Path(output_dir))
    tok = Tokenizer(out, {ENDOFTEXT: 0, **{t: n_base + k for k, t in enumerate(AQUILA_SPECIALS)}},
                    AQUILA_ROLES, n_base)
    tok.save(output_dir)
    return tok
