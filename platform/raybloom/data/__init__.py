"""Datasets: the sources people have (`sources`, `files`, `tables`, `images`, through `fs`), their prepared
form of Parquet shards (`shards`, written and opened by `prepared`), and the splits in memory
(`dataset`) or streamed from disk (`streamed`), as mini-batches (`batches`)."""

from raybloom.data.batches import Batches
from raybloom.data.checks import check_splits
from raybloom.data.dataset import Arrays, Dataset, Split, empty_split
from raybloom.data.prepared import (available_memory, check_fits, data_root, default_folder, in_memory_bytes, load,
                                    prepare_source, read_split, resolve, split_indices, wants_stream)
from raybloom.data.shards import (MANIFEST, META_KEY, SPLITS, is_prepared, read_manifest, read_table, split_files,
                                  split_rows, table_to_arrays, to_table)
from raybloom.data.sources import BUILTIN, Source, open_source
from raybloom.data.streamed import ShardedSplit, StreamedBatches

__all__ = ["Arrays", "BUILTIN", "Batches", "Dataset", "MANIFEST", "META_KEY", "SPLITS", "ShardedSplit", "Source", "Split",
           "StreamedBatches", "available_memory", "check_fits", "check_splits", "data_root", "default_folder", "empty_split",
           "in_memory_bytes", "is_prepared", "load", "open_source", "prepare_source", "read_manifest", "read_split",
           "read_table", "resolve", "split_files", "split_indices", "split_rows", "table_to_arrays", "to_table",
           "wants_stream"]
