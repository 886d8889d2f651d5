"""`tianying tokenizer train|stats`: train an Aquila-layout byte-level BPE, or measure tokenizers on a corpus."""

from __future__ import annotations

import argparse
import json
import sys

from tianying.cli._common import add_progress_arg, add_threads_arg
from tianying.errors import TianyingError

LANGS = ("en", "zh", "code")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenizer",
        help="train or compare byte-level BPE tokenizers",
        description="Train an Aquila-layout byte-level BPE tokenizer, or measure tokenizers on documents.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train a byte-level BPE in Aquila's layout",
        description="Train a GPT-2-style byte-level BPE with the `tokenizers` trainer and save it in Aquila's layout: "
                    "id 0 <|endoftext|>, ids 1..256 the byte symbols, then merges, then the 8 Aquila special "
                    "tokens (<|startofpiece|> ... [CLS] </s>) as the last ids. The directory loads with "
                    "tianying.tokenizer.Tokenizer.from_dir and with transformers' AutoTokenizer.",
        epilog="example: tianying tokenizer train --input corpus/zh.jsonl.gz corpus/en.jsonl.gz "
               "--vocab-size 16000 --output my-tokenizer",
    )
    t.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help='training files: JSONL with a "text" field (optionally .gz) or plain text')
    t.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="total ids including the 8 special tokens (Aquila: 100008)")
    t.add_argument("--output", required=True, metavar="DIR", help="directory to write the tokenizer files to")
    t.add_argument("--min-frequency", type=int, default=2, metavar="N",
                   help="a pair must occur at least N times to be merged (default: 2)")
    add_progress_arg(t)
    add_threads_arg(t, torch=False)
    t.set_defaults(func=run_train)

    s = sub.add_parser(
        "stats",
        help="tokens per document and bytes per token, per language",
        description="Encode documents with one or more tokenizers and report the vocabulary size, the average "
                    "number of tokens per document for English, Chinese and code (from each JSONL line's "
                    '"lang" field), and UTF-8 bytes per token (higher = better compression). Prints a table, '
                    "then the same numbers as one JSON line.",
        epilog="example: tianying tokenizer stats --tokenizer tianying/assets/demo-tokenizer "
               "--compare my-tokenizer --input corpus/en.valid.jsonl.gz corpus/zh.valid.jsonl.gz",
    )
    s.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory")
    s.add_argument("--compare", nargs="+", default=[], metavar="DIR", help="more tokenizer directories")
    s.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help='JSONL documents ({"text", "lang"}, optionally .gz) or plain-text files')
    s.add_argument("--max-docs", type=int, default=None, metavar="N",
                   help="use at most the first N documents of each language (default: all)")
    s.add_argument("--json", metavar="OUT", help="also write the JSON result to this file")
    add_progress_arg(s)
    add_threads_arg(s, torch=False)
    s.set_defaults(func=run_stats)


def run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tianying.tokenizer import iter_documents, train_bpe

    docs = tqdm(iter_documents(args.input), desc="reading", unit=" docs", disable=True if args.no_progress else None,
                file=sys.stderr)
    tok = train_bpe(args.input, args.vocab_size, args.output, min_frequency=args.min_frequency, texts=docs,
                    show_progress=sys.stderr.isatty() and not args.no_progress)
    print(f"wrote {args.output}: vocab_size {tok.vocab_size} ({tok.base_vocab_size} BPE + "
          f"{tok.vocab_size - tok.base_vocab_size} special), bos {tok.bos_id}, eos {tok.eos_id}, "
          f"unk/pad {tok.unk_id}")
    return 0


def tokenizer_stats(tokenizers: dict[str, object], docs: list[tuple[str, str]], progress: bool = True) -> list[dict]:
    """Per tokenizer: vocab size, tokens per document by language, bytes per token overall and by language."""
    from tqdm import tqdm

    by_lang: dict[str, list[str]] = {}
    for text, lang in docs:
        by_lang.setdefault(lang, []).append(text)
    results = []
    for name, tok in tokenizers.items():
        row: dict = {"tokenizer": name, "vocab_size": tok.vocab_size, "documents": {}, "tokens_per_doc": {},
                     "bytes_per_token": {}}
        total_tokens = total_bytes = 0
        for lang, texts in by_lang.items():
            n_tokens = n_bytes = 0
            bar = tqdm(total=len(texts), desc=f"{name} {lang}", unit=" docs", disable=None if progress else True,
                       file=sys.stderr)
            for i in range(0, len(texts), 256):
                batch = texts[i:i + 256]
                n_tokens += sum(len(ids) for ids in tok.encode_batch(batch))
                n_bytes += sum(len(t.encode("utf-8")) for t in batch)
                bar.update(len(batch))
            bar.close()
            row["documents"][lang] = len(texts)
            row["tokens_per_doc"][lang] = round(n_tokens / len(texts), 2)
            row["bytes_per_token"][lang] = round(n_bytes / max(n_tokens, 1), 3)
            total_tokens += n_tokens
            total_bytes += n_bytes
        row["bytes_per_token"]["all"] = round(total_bytes / max(total_tokens, 1), 3)
        results.append(row)
    return results


def format_table(results: list[dict]) -> str:
    langs = [lang for lang in LANGS if any(lang in r["tokens_per_doc"] for r in results)]
    langs += sorted({lang for r in results for lang in r["tokens_per_doc"]} - set(langs))
    header = ["tokenizer", "vocab"] + [f"{lang} tok/doc" for lang in langs] + ["bytes/token"]
    rows = [header]
    for r in results:
        rows.append([r["tokenizer"], str(r["vocab_size"])]
                    + [f'{r["tokens_per_doc"][lang]:.1f}' if lang in r["tokens_per_doc"] else "-" for lang in langs]
                    + [f'{r["bytes_per_token"]["all"]:.2f}'])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tianying.tokenizer import Tokenizer, iter_documents

    dirs = [args.tokenizer, *args.compare]
    tokenizers = {}
    for d in dirs:
        name = Path(d).name or str(d)
        if name in tokenizers:
            name = str(d)
        tokenizers[name] = Tokenizer.from_dir(d)
    docs: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    for text, lang in iter_documents(args.input, with_lang=True):
        lang = lang if isinstance(lang, str) and lang else "other"
        if args.max_docs is not None and counts.get(lang, 0) >= args.max_docs:
            continue
        counts[lang] = counts.get(lang, 0) + 1
        docs.append((text, lang))
    if not docs:
        raise TianyingError(f"no documents in {', '.join(args.input)}")
    results = tokenizer_stats(tokenizers, docs, progress=not args.no_progress)
    print(format_table(results))
    payload = {"inputs": list(args.input), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(payload, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(payload, ensure_ascii=False))
    return 0
