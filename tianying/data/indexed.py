"""Megatron `MMapIndexedDataset` files (.bin/.idx): writer, memory-mapped reader, and the `data index` builder.

Layout (seed-spec §7.4, little-endian): the .idx holds a 9-byte magic, version 1, a dtype code, the number
of items, the number of doc_idx entries, then `sizes` (int32 per item), `pointers` (int64 byte offset of
each item in the .bin) and `doc_idx` (int64, item index where each document starts, first 0, last = items).
The .bin is every item's token ids back to back, no header. We write one item per document, wrapped
BOS … EOS as the seed's `encode_plus` builder does, so files interoperate with Megatron/FlagAI readers.

The reader validates every size and offset against the file lengths before handing out a single token:
a truncated or corrupted file raises `DataError` instead of training on garbage.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from tianying.errors import TianyingError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, len, doc_count
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64,
    8: np.uint16,
}  # code 6 is Megatron's `np.float`, which numpy took to mean float64; token files never use 6 or 7
_CODE_OF = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
            np.dtype(np.int64): 5, np.dtype(np.uint16): 8}


class DataError(TianyingError):
    """A dataset file that is missing, truncated, corrupt, or does not match what the run expects."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (the seed's builder uses the 65,500 cut-off), else int32 (Aquila's 100,008)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def _paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    p = str(prefix)
    for ext in (".bin", ".idx"):
        if p.endswith(ext):
            p = p[: -len(ext)]
    return Path(p + ".bin"), Path(p + ".idx")


# ---------------------------------------------------------------------------------------------- writing
class IndexedDatasetWriter:
    """Streams items to PREFIX.bin and writes PREFIX.idx on `close()`; both appear atomically (temp + rename).

    Call `add_item(ids)` for each sequence and `end_document()` after the items of one document (with one item
    per document, `add_document(ids)` does both).
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.int32) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise DataError(f"unsupported element type {self.dtype}")
        self.bin_path, self.idx_path = _paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + f".tmp{os.getpid()}")
        self._bin = open(self._tmp_bin, "wb")  # noqa: SIM115 — closed in close()/abort()
        self.sizes: list[int] = []
        self.doc_idx: list[int] = [0]
        self._limit = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None

    def add_item(self, ids: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(ids)
        if arr.size and self._limit is not None and (arr.max() > self._limit or arr.min() < 0):
            raise DataError(f"token id {int(arr.max())} does not fit the dataset's element type {self.dtype}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self.sizes.append(int(arr.size))

    def end_document(self) -> None:
        self.doc_idx.append(len(self.sizes))

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        self.add_item(ids)
        self.end_document()

    def close(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        write_index(self.idx_path, self.dtype, np.asarray(self.sizes, np.int32), np.asarray(self.doc_idx, np.int64))
        os.replace(self._tmp_bin, self.bin_path)  # .idx first: a .bin without its .idx is never mistaken as whole

    def abort(self) -> None:
        self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_index(idx_path: str | os.PathLike, dtype: np.dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> None:
    """Write a .idx (atomically) for items of `sizes` stored back to back with element type `dtype`."""
    dtype = np.dtype(dtype)
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_idx = np.asarray(doc_idx, dtype=np.int64)
    idx_path = Path(idx_path)
    tmp = idx_path.with_name(idx_path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", _CODE_OF[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(doc_idx.astype("<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, idx_path)


# ---------------------------------------------------------------------------------------------- reading
class IndexedDataset:
    """Read-only, memory-mapped view of PREFIX.bin/.idx; `ds[i]` is item i as a numpy array (no copy).

    Memory mapping keeps RAM flat for corpora far larger than memory, and lets DataLoader workers and
    torchrun ranks share the page cache.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.bin_path, self.idx_path = _paths(prefix)
        self.prefix = str(self.bin_path)[:-4]
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise DataError(f"indexed dataset file {p} not found (expected PREFIX.bin and PREFIX.idx)")
        self._read_index()
        self._bin = np.memmap(self.bin_path, dtype=self.dtype, mode="r") if self.num_tokens else np.zeros(
            0, self.dtype)

    def _read_index(self) -> None:
        path = self.idx_path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            raise DataError(f"{path}: truncated .idx header ({len(head)} of {HEADER_SIZE} bytes)")
        if head[:9] != MAGIC:
            raise DataError(f"{path}: not a Megatron MMapIndexedDataset index (bad magic {head[:9]!r})")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != VERSION:
            raise DataError(f"{path}: unsupported .idx version {version} (expected {VERSION})")
        code = head[17]
        if code not in DTYPE_CODES:
            raise DataError(f"{path}: unknown element type code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n, n_doc = struct.unpack("<QQ", head[18:34])
        expected = HEADER_SIZE + 4 * n + 8 * n + 8 * n_doc
        if size != expected:
            raise DataError(f"{path}: truncated or corrupt .idx: {size} bytes, but the header's {n} items and "
                            f"{n_doc} document entries need {expected}")
        idx = np.memmap(path, dtype=np.uint8, mode="r")
        off = HEADER_SIZE
        self.sizes = np.frombuffer(idx, dtype="<i4", count=n, offset=off)
        off += 4 * n
        self.pointers = np.frombuffer(idx, dtype="<i8", count=n, offset=off)
        off += 8 * n
        self.doc_idx = np.frombuffer(idx, dtype="<i8", count=n_doc, offset=off)
        self._check(path)

    def _check(self, path: Path) -> None:
        sizes, pointers, doc_idx = self.sizes, self.pointers, self.doc_idx
        n = len(sizes)
        if n and sizes.min() < 0:
            raise DataError(f"{path}: corrupt .idx (negative item size)")
        expect = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=expect[1:])
        if not np.array_equal(expect, pointers):
            raise DataError(f"{path}: corrupt .idx (item pointers do not match item sizes)")
        if len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] != n or (np.diff(doc_idx) < 0).any():
            raise DataError(f"{path}: corrupt .idx (document index is not 0 … {n}, non-decreasing)")
        self.num_tokens = int(sizes.astype(np.int64).sum())
        need = self.num_tokens * self.dtype.itemsize
        have = self.bin_path.stat().st_size
        if have != need:
            raise DataError(f"{self.bin_path}: {have} bytes, but its .idx describes {need} "
                            f"({self.num_tokens} tokens of {self.dtype}); the pair is truncated or mismatched")

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_docs(self) -> int:
        return len(self.doc_idx) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        i %= len(self)
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self._bin[start:start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of item i (the whole rest when length is None)."""
        item = self[i]
        return item[offset:] if length is None else item[offset:offset + length]

    def max_token(self) -> int:
        return int(self._bin.max()) if self.num_tokens else -1


# ---------------------------------------------------------------------------------------------- building
def read_documents(path: str | os.PathLike, json_key: str = "text", text_split: str = "paragraph") -> Iterator[str]:
    """Documents of one input file: JSONL (`.jsonl`, `.json`, optionally `.gz`) by `json_key`, else plain text.

    Plain text splits into documents at blank lines (`paragraph`), per line (`line`), or not at all (`file`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} not found")
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    opener = gzip.open if path.name.endswith(".gz") else open
    is_json = name.endswith((".jsonl", ".json", ".ndjson"))
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if is_json:
                yield from _jsonl_docs(f, path, json_key)
            else:
                yield from _text_docs(f, text_split)
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, OSError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _jsonl_docs(f: io.TextIOBase, path: Path, key: str) -> Iterator[str]:
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or key not in obj:
            raise DataError(f"{path}:{lineno}: no {key!r} field (use --json-key to choose another)")
        text = obj[key]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field {key!r} is not a string")
        if text:
            yield text


def _text_docs(f: io.TextIOBase, mode: str) -> Iterator[str]:
    if mode == "file":
        text = f.read()
        if text.strip():
            yield text
        return
    if mode == "line":
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                yield line
        return
    buf: list[str] = []
    for line in f:
        if line.strip():
            buf.append(line)
        elif buf:
            yield "".join(buf).rstrip("\n")
            buf = []
    if buf:
        yield "".join(buf).rstrip("\n")


_WORKER_TOK = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOK
    from tianying.tokenizer import Tokenizer

    _WORKER_TOK = Tokenizer.from_dir(tokenizer_dir)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    tok = _WORKER_TOK
    return [np.asarray(tok.encode(t, bos=True, eos=True), dtype=np.int64) for t in texts]


def _chunks(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for d in docs:
        buf.append(d)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def build_indexed_dataset(inputs: Sequence[str | os.PathLike], tokenizer_dir: str | os.PathLike,
                          output_prefix: str | os.PathLike, workers: int = 1, json_key: str = "text",
                          text_split: str = "paragraph", chunk_size: int = 256, progress: bool = True) -> dict:
    """Tokenize documents into PREFIX.bin/.idx, one BOS … EOS item per document; returns counts.

    Workers encode chunks of documents in parallel; `imap` keeps their order, so the output does not
    depend on the number of workers.
    """
    from tianying.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    if tok.bos_id is None or tok.eos_id is None:
        raise DataError(f"tokenizer {tokenizer_dir} has no BOS/EOS token; pretraining documents are wrapped in both")
    for p in inputs:
        if not Path(p).is_file():
            raise DataError(f"input file {p} not found")
    dtype = dtype_for_vocab(tok.vocab_size)
    docs = (d for p in inputs for d in read_documents(p, json_key, text_split))
    chunks = _chunks(docs, chunk_size)
    n_docs = n_tokens = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="indexing", unit=" docs", dynamic_ncols=True)
    pool = None
    try:
        with IndexedDatasetWriter(output_prefix, dtype) as writer:
            if workers > 1:
                import multiprocessing as mp

                pool = mp.get_context("spawn" if os.name == "nt" else "fork").Pool(
                    workers, initializer=_init_worker, initargs=(str(tokenizer_dir),))
                encoded = pool.imap(_encode_chunk, chunks)
            else:
                global _WORKER_TOK
                _WORKER_TOK = tok
                encoded = map(_encode_chunk, chunks)
            for batch in encoded:
                for ids in batch:
                    writer.add_document(ids)
                    n_tokens += len(ids)
                n_docs += len(batch)
                if bar is not None:
                    bar.update(len(batch))
                    bar.set_postfix(tokens=n_tokens, refresh=False)
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    if n_docs == 0:
        raise DataError("no documents found in the inputs")
    bin_path, idx_path = _paths(output_prefix)
    return {"documents": n_docs, "tokens": n_tokens, "dtype": str(dtype), "vocab_size": tok.vocab_size,
            "bin": str(bin_path), "idx": str(idx_path)}
