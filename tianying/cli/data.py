"""`tianying data index|info`: build and inspect Megatron .bin/.idx pretraining datasets."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("data", help="build indexed pretraining datasets (.bin/.idx)",
                       description="Tokenize text into Megatron MMapIndexedDataset files, one BOS … EOS "
                                   "sequence per document.")
    dsub = p.add_subparsers(dest="data_cmd", metavar="CMD")
    dsub.required = True
    ix = dsub.add_parser("index", help="tokenize JSONL / text files into PREFIX.bin and PREFIX.idx",
                         description="Tokenize JSONL or plain-text files (optionally .gz) into a Megatron "
                                     "MMapIndexedDataset, PREFIX.bin + PREFIX.idx: one BOS … EOS sequence per "
                                     "document, the input for `tianying pretrain` (data=PREFIX).")
    ix.add_argument("--input", nargs="+", required=True, metavar="FILE",
                    help="JSONL ({\"text\": ...} per line) or plain-text files, optionally .gz")
    ix.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory")
    ix.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    ix.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    ix.add_argument("--json-key", default="text", help="JSONL field holding the document (default text)")
    ix.add_argument("--text-split", choices=["paragraph", "line", "file"], default="paragraph",
                    help="plain text: a document per blank-line-separated paragraph (default), line, or file")
    ix.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                    help="no progress bar (--quiet: the old name)")
    ix.set_defaults(func=run_index)
    info = dsub.add_parser("info", help="print the size and element type of an indexed dataset",
                           description="Print an indexed dataset's documents, sequences, tokens, element type "
                                       "and largest token id as one JSON line.")
    info.add_argument("prefix", metavar="PREFIX")
    info.set_defaults(func=run_info)


def run_index(args) -> int:
    from tianying.data.indexed import build_indexed_dataset

    stats = build_indexed_dataset(args.input, args.tokenizer, args.output, workers=max(1, args.workers),
                                  json_key=args.json_key, text_split=args.text_split, progress=not args.no_progress)
    print(f"{stats['documents']} documents, {stats['tokens']} tokens ({stats['dtype']}) → "
          f"{stats['bin']}, {stats['idx']}")
    return 0


def run_info(args) -> int:
    from tianying.data.indexed import IndexedDataset

    ds = IndexedDataset(args.prefix)
    print(json.dumps({"prefix": ds.prefix, "documents": ds.num_docs, "sequences": len(ds),
                      "tokens": ds.num_tokens, "dtype": str(ds.dtype), "max_token": ds.max_token()}))
    return 0
