"""Indexed datasets (.bin/.idx) and packed samples."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tianying.data.indexed import (
    DataError,
    IndexedDataset,
    IndexedDatasetWriter,
    build_indexed_dataset,
    dtype_for_vocab,
    read_documents,
)
from tianying.data.pack import BlendedDataset, PackedDataset, build_pretrain_datasets, parse_data_spec, split_documents

DATA = Path(__file__).parent / "data"
TOK = DATA / "tokenizer"


def _write(prefix: Path, docs: list[list[int]], dtype=np.uint16) -> None:
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)


def test_write_read_round_trip(tmp_path):
    docs = [[1, 5, 6, 2], [1, 2], [1, 70000 % 65535, 9, 9, 9, 2], []]
    _write(tmp_path / "a", docs)
    ds = IndexedDataset(tmp_path / "a")
    assert len(ds) == 4 and ds.num_docs == 4 and ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(4)] == docs
    assert ds.num_tokens == sum(map(len, docs))
    assert ds.doc_idx.tolist() == [0, 1, 2, 3, 4]
    assert ds.get(2, 1, 3).tolist() == docs[2][1:4]
    assert (tmp_path / "a.bin").stat().st_size == 2 * ds.num_tokens


def test_dtype_choice_and_int32():
    assert dtype_for_vocab(16000) == np.uint16 and dtype_for_vocab(100008) == np.int32


def test_int32_and_overflow(tmp_path):
    _write(tmp_path / "b", [[100006, 5, 100007]], np.int32)
    ds = IndexedDataset(tmp_path / "b")
    assert ds.dtype == np.int32 and ds[0].tolist() == [100006, 5, 100007]
    with pytest.raises(DataError, match="does not fit"):
        _write(tmp_path / "c", [[100006]], np.uint16)
    assert not (tmp_path / "c.idx").exists()  # an aborted write leaves nothing behind


def test_hand_built_idx(tmp_path):
    """The exact byte layout of seed-spec §7.4: magic, version, dtype code, len, doc_count, arrays."""
    sizes, doc_idx = [3, 2, 4], [0, 2, 3]  # two documents: items 0-1 and item 2
    tokens = [10, 11, 12, 20, 21, 30, 31, 32, 33]
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4) + struct.pack("<QQ", 3, 3)
    idx += struct.pack("<3i", *sizes) + struct.pack("<3q", 0, 12, 20) + struct.pack("<3q", *doc_idx)
    (tmp_path / "h.idx").write_bytes(idx)
    (tmp_path / "h.bin").write_bytes(struct.pack("<9i", *tokens))
    ds = IndexedDataset(tmp_path / "h")
    assert ds.dtype == np.int32 and ds.num_docs == 2
    assert [ds[i].tolist() for i in range(3)] == [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
    # and our writer produces the same bytes
    with IndexedDatasetWriter(tmp_path / "w", np.int32) as w:
        w.add_item(tokens[:3])
        w.add_item(tokens[3:5])
        w.end_document()
        w.add_document(tokens[5:])
    assert (tmp_path / "w.idx").read_bytes() == idx
    assert (tmp_path / "w.bin").read_bytes() == (tmp_path / "h.bin").read_bytes()


@pytest.mark.parametrize("damage", ["magic", "truncate_idx", "truncate_bin", "pointers", "version", "missing_bin"])
def test_corrupt_files_raise(tmp_path, damage):
    _write(tmp_path / "d", [[1, 2, 3], [4, 5]])
    idx, bin_ = tmp_path / "d.idx", tmp_path / "d.bin"
    raw = bytearray(idx.read_bytes())
    if damage == "magic":
        raw[0:3] = b"XXX"
    elif damage == "truncate_idx":
        raw = raw[:-5]
    elif damage == "pointers":
        raw[34 + 8 + 8:34 + 8 + 16] = struct.pack("<q", 7)  # second pointer
    elif damage == "version":
        raw[9:17] = struct.pack("<Q", 2)
    idx.write_bytes(bytes(raw))
    if damage == "truncate_bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    if damage == "missing_bin":
        bin_.unlink()
    with pytest.raises(DataError):
        IndexedDataset(tmp_path / "d")


def test_build_from_jsonl_matches_tokenizer(tmp_path):
    from tianying.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(TOK)
    texts = [json.loads(line)["text"] for line in (DATA / "tiny.jsonl").read_text().splitlines()[:40]]
    src = tmp_path / "in.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "lang": "x"}) + "\n")
    stats = build_indexed_dataset([src], TOK, tmp_path / "one", workers=1, chunk_size=7, progress=False)
    ds = IndexedDataset(tmp_path / "one")
    assert stats["documents"] == len(ds) == len(texts)
    for i, t in enumerate(texts):
        ids = ds[i].tolist()
        assert ids == tok.encode(t, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    build_indexed_dataset([src], TOK, tmp_path / "two", workers=2, chunk_size=7, progress=False)
    assert (tmp_path / "two.bin").read_bytes() == (tmp_path / "one.bin").read_bytes()
    assert (tmp_path / "two.idx").read_bytes() == (tmp_path / "one.idx").read_bytes()


def test_plain_text_and_bad_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nline two\n\n\nsecond\n")
    assert list(read_documents(tmp_path / "a.txt")) == ["first para\nline two", "second"]
    assert list(read_documents(tmp_path / "a.txt", text_split="line")) == ["first para", "line two", "second"]
    assert len(list(read_documents(tmp_path / "a.txt", text_split="file"))) == 1
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"b.jsonl:2"):
        list(read_documents(tmp_path / "b.jsonl"))
    (tmp_path / "c.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match="no 'text' field"):
        list(read_documents(tmp_path / "c.jsonl"))


def test_cli_index(tmp_path, capsys):
    from tianying.cli import main

    rc = main(["data", "index", "--input", str(DATA / "tiny.jsonl"), "--tokenizer", str(TOK),
               "--output", str(tmp_path / "t"), "--quiet"])
    assert rc == 0 and IndexedDataset(tmp_path / "t").num_docs == 204
    assert main(["data", "info", str(tmp_path / "t")]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["documents"] == 204 and info["dtype"] == "uint16"
    (tmp_path / "t.bin").write_bytes(b"\0" * 10)
    assert main(["data", "info", str(tmp_path / "t")]) == 2  # corrupt → one-line error, exit 2
    assert "truncated or mismatched" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- packing
@pytest.fixture
def small(tmp_path):
    rng = np.random.default_rng(0)
    docs = [[1, *rng.integers(3, 500, size=int(n)).tolist(), 2] for n in rng.integers(5, 60, size=50)]
    _write(tmp_path / "s", docs)
    return IndexedDataset(tmp_path / "s"), docs


def test_packed_samples_are_the_document_stream(small):
    ds, docs = small
    seq = 16
    p = PackedDataset(ds, seq, shuffle=False)
    stream = np.concatenate([np.array(d) for d in docs])
    assert len(p) == (len(stream) - 1) // seq
    for i in range(len(p)):
        s = p[i]
        assert len(s) == seq + 1
        assert s.tolist() == stream[i * seq:i * seq + seq + 1].tolist()  # neighbours share a boundary token


def test_packed_shuffle_is_seeded(small):
    ds, docs = small
    a, b, c = (PackedDataset(ds, 16, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(a[i], b[i]) for i in range(len(a)))
    assert any(not np.array_equal(a[i], c[i]) for i in range(len(a)))
    # every sample's tokens are a window of the per-epoch shuffled stream: multiset of tokens is preserved
    many = PackedDataset(ds, 16, num_samples=3 * len(a), seed=1)
    assert many.epochs >= 3 and len(many) == 3 * len(a)
    assert max(max(many[i]) for i in range(len(many))) < 500


def test_split_by_document(small):
    ds, _ = small
    tr, va = split_documents(ds.num_docs, "90,10")
    assert set(tr).isdisjoint(va) and len(tr) + len(va) == 50 and len(va) == 5
    pv = PackedDataset(ds, 8, va, shuffle=False)
    held = set(np.concatenate([ds[i] for i in va]).tolist())
    assert all(set(pv[i].tolist()) <= held for i in range(len(pv)))


def test_blend_follows_weights(tmp_path):
    _write(tmp_path / "x", [[1] * 400])
    _write(tmp_path / "y", [[2] * 400])
    px, py = PackedDataset(IndexedDataset(tmp_path / "x"), 4), PackedDataset(IndexedDataset(tmp_path / "y"), 4)
    b = BlendedDataset([px, py], [0.75, 0.25], 40)
    src = [int(b[i][0]) for i in range(40)]
    assert src.count(1) == 30 and src.count(2) == 10
    assert src[:4].count(1) == 3  # every prefix is close to the mix
    assert parse_data_spec("0.7 a 0.3 b") == [(0.7, "a"), (0.3, "b")]
    assert parse_data_spec([[2, "a"], [1, "b"]]) == [(2.0, "a"), (1.0, "b")]
    assert parse_data_spec("a") == [(1.0, "a")]
    train, valid = build_pretrain_datasets(f"3 {tmp_path / 'x'} 1 {tmp_path / 'y'}", None, 4, 0, None, 20)
    assert len(train) == 20 and valid is None
    assert [int(train[i][0]) for i in range(20)].count(1) == 15
