"""Fixed-length pretraining samples packed from an indexed dataset, the Megatron GPT way (seed-spec §7.4).

Documents (BOS … EOS each) are concatenated in a shuffled order and cut into samples of `seq_length + 1`
tokens; consecutive samples share one boundary token, so no token is padding and none is dropped except
the tail. Sample order is shuffled again. Everything is a pure function of (sizes, documents, seq_length,
seed, num_samples): the same files and seed give the same samples on every rank and after every resume.

Unlike Megatron we compute the sample boundaries with one `searchsorted` over the cumulative token counts
instead of a compiled loop, and we keep no cache files: for a corpus of 10⁷ documents the index takes well
under a second to build.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tianying.data.indexed import DataError, IndexedDataset


def split_documents(n_docs: int, split: str | Sequence[float] | None) -> tuple[range, range]:
    """Document ranges (train, valid) from weights like "98,2" (by document index, as Megatron's splits)."""
    if split is None:
        return range(n_docs), range(n_docs, n_docs)
    parts = [float(x) for x in (split.replace("/", ",").split(",") if isinstance(split, str) else split)]
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DataError(f"split {split!r} must be 1–3 non-negative weights like '98,2'")
    total = sum(parts)
    cut = int(round(n_docs * parts[0] / total))
    end = n_docs if len(parts) < 3 else cut + int(round(n_docs * parts[1] / total))
    return range(0, cut), range(cut, end)


class PackedDataset:
    """`ds[i]` → int64 array of seq_length+1 tokens: sample i of the shuffled, packed documents `docs`.

    Args:
        data: an IndexedDataset (one item per document, as `tianying data index` writes).
        seq_length: tokens the model sees per sample; each sample holds one more (the last target).
        docs: document indices to use (a split); default all.
        num_samples: samples wanted; the documents are repeated for as many epochs as that needs, each
            epoch in its own shuffled order. Default: one epoch's worth.
        seed: shuffling seed; shuffle=False keeps document and sample order (for validation).
    """

    def __init__(self, data: IndexedDataset, seq_length: int, docs: Sequence[int] | range | None = None,
                 num_samples: int | None = None, seed: int = 1234, shuffle: bool = True) -> None:
        self.data, self.seq_length = data, int(seq_length)
        docs = np.arange(data.num_docs) if docs is None else np.asarray(docs, dtype=np.int64)
        # items of the chosen documents (one per document for our files; Megatron sentence files have more)
        starts, ends = data.doc_idx[docs], data.doc_idx[docs + 1]
        items = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(docs) else np.zeros(0, int)
        tokens_per_epoch = int(data.sizes[items].astype(np.int64).sum())
        per_epoch = (tokens_per_epoch - 1) // self.seq_length if tokens_per_epoch else 0
        if per_epoch < 1:
            raise DataError(f"{data.prefix}: {len(docs)} documents hold {tokens_per_epoch} tokens, fewer than one "
                            f"sample of {self.seq_length + 1}")
        if num_samples is None:
            num_samples, epochs = per_epoch, 1
        else:
            epochs = 1
            while (epochs * tokens_per_epoch - 1) // self.seq_length < num_samples:
                epochs += 1
        rng = np.random.RandomState(seed % 2**32)
        order = []
        for _ in range(epochs):
            order.append(rng.permutation(items) if shuffle else items)
        self.items = np.concatenate(order)  # item id at each position of the token stream
        self.cum = np.zeros(len(self.items) + 1, dtype=np.int64)  # stream offset where each position starts
        np.cumsum(data.sizes[self.items].astype(np.int64), out=self.cum[1:])
        self.num_samples = int(num_samples)
        self.order = rng.permutation(self.num_samples) if shuffle else np.arange(self.num_samples)
        self.epochs = epochs

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples}")
        start = int(self.order[i]) * self.seq_length
        end = start + self.seq_length + 1
        pos = int(np.searchsorted(self.cum, start, side="right")) - 1
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        n = 0
        while n < len(out):
            off = start + n - int(self.cum[pos])
            chunk = self.data.get(int(self.items[pos]), off, end - start - n)
            out[n:n + len(chunk)] = chunk
            n += len(chunk)
            pos += 1
        return out


def document_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Per-token document index of packed samples [..., T]: a new document starts after every EOS (documents are
    BOS … EOS each), so `Transformer.forward(doc_ids=...)` can keep them apart. Off by default in pretraining
    (nanochat measured no gain from isolating pretraining documents); `isolate_docs: true` turns it on."""
    ends = np.asarray(tokens) == eos_id
    ids = np.zeros(ends.shape, dtype=np.int64)
    np.cumsum(ends[..., :-1], axis=-1, out=ids[..., 1:])
    return ids


def collate_packed_docs(eos_id: int):  # noqa: ANN201
    """A collate like `loop.collate_packed` that adds the samples' document ids: (tokens[:-1], tokens[1:], ids)."""
    import torch

    def collate(samples):  # noqa: ANN001, ANN202
        x = np.stack([np.asarray(s, dtype=np.int64) for s in samples])
        docs = document_ids(x[:, :-1], eos_id)
        return (torch.from_numpy(x[:, :-1].copy()), torch.from_numpy(x[:, 1:].copy()), torch.from_numpy(docs))

    return collate


class BlendedDataset:
    """Weighted mix of datasets: sample i comes from the source whose share is furthest behind its weight.

    This greedy rule (Megatron's `build_blending_indices`) keeps every prefix of the stream close to the
    weights, so a short run sees the intended mix too, and it is deterministic.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], num_samples: int) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(datasets) != len(w) or (w < 0).any() or w.sum() <= 0:
            raise DataError(f"blend weights {list(weights)} do not fit {len(datasets)} datasets")
        w = w / w.sum()
        self.datasets, self.weights, self.num_samples = list(datasets), w, int(num_samples)
        self.source = np.zeros(self.num_samples, dtype=np.int32)
        self.index = np.zeros(self.num_samples, dtype=np.int64)
        counts = np.zeros(len(w), dtype=np.int64)
        for i in range(self.num_samples):
            k = int(np.argmax(w * (i + 1) - counts))
            self.source[i], self.index[i] = k, counts[k]
            counts[k] += 1
        for k, (ds, c) in enumerate(zip(self.datasets, counts)):
            if c > len(ds):
                raise DataError(f"blend source {k} has {len(ds)} samples but {c} are needed")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[self.source[i]][int(self.index[i])]


def parse_data_spec(spec) -> list[tuple[float, str]]:
    """(weight, prefix) pairs from "PREFIX", "0.7 A 0.3 B", ["A", "B"], [[0.7, "A"], [0.3, "B"]] or {A: 0.7}."""
    if spec is None:
        return []
    if isinstance(spec, dict):
        return [(float(w), str(p)) for p, w in spec.items()]
    if isinstance(spec, str):
        parts = spec.replace(",", " ").split()
    else:
        parts = []
        for x in spec:
            parts.extend(x if isinstance(x, (list, tuple)) else [x])
    parts = [str(p) for p in parts]
    if len(parts) == 1:
        return [(1.0, parts[0])]

    def is_num(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if all(not is_num(p) for p in parts):
        return [(1.0, p) for p in parts]
    if len(parts) % 2 or not all(is_num(w) for w in parts[::2]):
        raise DataError(f"data spec {spec!r}: expected PREFIX or pairs of WEIGHT PREFIX")
    return [(float(w), p) for w, p in zip(parts[::2], parts[1::2])]


def build_pretrain_datasets(data, valid_data, seq_length: int, seed: int, split: str | None,
                            num_samples: int | None = None):
    """(train, valid or None) packed datasets for weighted index prefixes.

    Without `valid_data`, each prefix is split by document (`split`, e.g. "98,2") and the held-out
    documents form the validation set; validation samples are never shuffled.
    """
    train_spec, valid_spec = parse_data_spec(data), parse_data_spec(valid_data)
    if not train_spec:
        raise DataError("no training data: set `data` to an index prefix written by `tianying data index`")
    total_w = sum(w for w, _ in train_spec)
    trains, valids = [], []
    for k, (w, prefix) in enumerate(train_spec):
        ds = IndexedDataset(prefix)
        tr, va = split_documents(ds.num_docs, None if valid_spec else split)
        want = None
        if num_samples is not None and len(train_spec) > 1:
            want = int(math.ceil(num_samples * w / total_w * 1.005)) + 1
        elif num_samples is not None:
            want = num_samples
        trains.append(PackedDataset(ds, seq_length, tr, want, seed=seed + k))
        if len(va):
            try:
                valids.append(PackedDataset(ds, seq_length, va, None, seed=seed, shuffle=False))
            except DataError:
                pass  # too few held-out tokens in this prefix for one sample
    for _, prefix in valid_spec:
        ds = IndexedDataset(prefix)
        valids.append(PackedDataset(ds, seq_length, None, None, seed=seed, shuffle=False))
    if len(trains) == 1:
        train = trains[0]
    else:
        # without a target count: as many as the scarcest source allows (the greedy mix may run one ahead)
        n = num_samples or int(min(len(t) / (w / total_w) for t, (w, _) in zip(trains, train_spec)) * 0.995)
        n -= len(trains) if not num_samples else 0
        train = BlendedDataset(trains, [w for w, _ in train_spec], n)
    valid = None
    if valids:
        valid = valids[0] if len(valids) == 1 else _Concat(valids)
    return train, valid


class _Concat:
    def __init__(self, parts: list) -> None:
        self.parts = parts
        self.cum = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.cum[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.cum, i, side="right")) - 1
        return self.parts[k][i - int(self.cum[k])]
