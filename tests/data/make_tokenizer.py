"""Regenerate the committed tokenizers (deterministic: same inputs give the same files).

    .venv/bin/python tests/data/make_tokenizer.py            # tests/data/tokenizer/ from tests/data/tiny.jsonl
    .venv/bin/python tests/data/make_tokenizer.py --demo     # tianying/assets/demo-tokenizer/ from the corpus

The test fixture is a 3,008-id Aquila-layout BPE (3,000 base + 8 specials) so tests load in milliseconds.
The demo tokenizer (16,000 ids: 15,992 base + 8 specials, the `demo` config's vocab) is trained on an equal
character budget of Chinese, English and Python taken from the start of each shared corpus file (the files are
in a pseudo-random order, so a prefix is a fair sample); equal characters rather than equal bytes, so Chinese
(3 bytes per character) is not under-represented in merges.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tianying.tokenizer import iter_documents, train_bpe

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path("/work/shared/data/corpus")
CHARS_PER_LANG = 3_000_000


def sample(path: Path, budget: int):
    used = 0
    for text in iter_documents([path]):
        if used >= budget:
            return
        yield text
        used += len(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", action="store_true", help="build tianying/assets/demo-tokenizer/ instead")
    ap.add_argument("--corpus", type=Path, default=CORPUS, help="directory with {zh,en,code}.jsonl.gz")
    args = ap.parse_args()
    if args.demo:
        out = ROOT / "tianying/assets/demo-tokenizer"
        texts = (t for lang in ("zh", "en", "code") for t in sample(args.corpus / f"{lang}.jsonl.gz", CHARS_PER_LANG))
        tok = train_bpe([], 16000, out, texts=texts, show_progress=True)
    else:
        out = ROOT / "tests/data/tokenizer"
        tok = train_bpe([ROOT / "tests/data/tiny.jsonl"], 3008, out)
    print(f"{out}: {tok}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
