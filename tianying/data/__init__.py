"""Pretraining data: Megatron .bin/.idx files (`indexed`) and fixed-length packed samples (`pack`)."""

from tianying.data.indexed import DataError, IndexedDataset, IndexedDatasetWriter, build_indexed_dataset
from tianying.data.pack import BlendedDataset, PackedDataset, build_pretrain_datasets, parse_data_spec

__all__ = [
    "DataError", "IndexedDataset", "IndexedDatasetWriter", "build_indexed_dataset",
    "BlendedDataset", "PackedDataset", "build_pretrain_datasets", "parse_data_spec",
]
