"""Datasets: the sources people have (`sources`), their prepared Parquet form (`prepared`), and the
splits in memory (`dataset`) as mini-batches (`batches`)."""

from raybloom.data.batches import Batches
from raybloom.data.dataset import Arrays, Dataset, empty_split
from raybloom.data.prepared import (META_KEY, SPLITS, data_root, default_folder, is_prepared, load, prepare_source,
                                    read_split, read_table, resolve, split_indices, table_to_arrays, to_table, write)
from raybloom.data.sources import BUILTIN, load_source

__all__ = ["Arrays", "BUILTIN", "Batches", "Dataset", "META_KEY", "SPLITS", "data_root", "default_folder", "empty_split",
           "is_prepared", "load", "load_source", "prepare_source", "read_split", "read_table", "resolve",
           "split_indices", "table_to_arrays", "to_table", "write"]
