"""Corpora (the bundled Shakespeare, text files, folders, JSONL), splits and batching."""

from lmarch.data.batches import RandomBlockSampler
from lmarch.data.corpus import Document, load_documents, shakespeare_documents, train_val_split

__all__ = [
    "Document",
    "RandomBlockSampler",
    "load_documents",
    "shakespeare_documents",
    "train_val_split",
]
