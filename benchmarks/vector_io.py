"""Vector files: lmarch's reader and writer against gensim's, on the same file in each format.

A table of ``--words`` x ``--dim`` float32 vectors (normal values, words ``w0, w1, ...``) is
written once in each of the three layouts; then each side reads it (lmarch ``read_vector_arrays``,
gensim ``KeyedVectors.load_word2vec_format``) and writes it (``write_vectors``,
``save_word2vec_format``), the median over ``--repeats``. Every read is checked equal, bit for
bit, to the table. Ratios above 1 mean lmarch is faster.

    python benchmarks/vector_io.py [--words 100000] [--dim 100] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import gensim
import numpy as np
import torch
from gensim.models import KeyedVectors

from lmarch.classic.vector_io import FORMATS, read_vector_arrays, write_vectors
from lmarch.classic.vectors import WordVectors


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(fmt: str, folder: Path, vectors: WordVectors, kv: KeyedVectors, repeats: int) -> dict:
    """Read and write times of both sides for one layout; the reads checked bit-equal."""
    path = folder / f"vectors.{fmt}"
    write_vectors(vectors, path, fmt)
    binary, no_header = fmt == "word2vec-binary", fmt == "glove"

    def ours():
        return read_vector_arrays(path, fmt)

    def theirs():
        return KeyedVectors.load_word2vec_format(str(path), binary=binary, no_header=no_header)

    got_words, got = ours()
    peer = theirs()
    assert got_words == vectors.words and torch.equal(got, vectors.vectors)
    assert peer.index_to_key == vectors.words and np.array_equal(peer.vectors, got.numpy())
    row = {
        "bytes": path.stat().st_size,
        "read_lmarch_s": median_seconds(ours, repeats),
        "read_gensim_s": median_seconds(theirs, repeats),
        "write_lmarch_s": median_seconds(
            lambda: write_vectors(vectors, folder / "ours.out", fmt), repeats
        ),
        "write_gensim_s": median_seconds(
            lambda: kv.save_word2vec_format(
                str(folder / "theirs.out"), binary=binary, write_header=not no_header
            ),
            repeats,
        ),
    }
    row["read_speedup"] = row["read_gensim_s"] / row["read_lmarch_s"]
    row["write_speedup"] = row["write_gensim_s"] / row["write_lmarch_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="2,000 words, 1 repeat")
    parser.add_argument("--json", action="store_true", help="print one JSON object as last line")
    args = parser.parse_args()
    words, repeats = (2000, 1) if args.tiny else (args.words, args.repeats)
    logging.getLogger("gensim").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    table = torch.randn(words, args.dim, generator=torch.Generator().manual_seed(0))
    vectors = WordVectors([f"w{i}" for i in range(words)], table)
    kv = KeyedVectors(args.dim)
    kv.add_vectors(vectors.words, table.numpy())
    with tempfile.TemporaryDirectory() as tmp:
        results = {fmt: bench(fmt, Path(tmp), vectors, kv, repeats) for fmt in FORMATS}

    print(f"vector files: {words:,} words x {args.dim} dims, median of {repeats}")
    print()
    print("| format | MB | read lmarch s | read gensim s | read x | write lmarch s "
          "| write gensim s | write x |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for fmt, r in results.items():
        print(
            f"| {fmt} | {r['bytes'] / 1e6:.1f} | {r['read_lmarch_s']:.2f} "
            f"| {r['read_gensim_s']:.2f} | {r['read_speedup']:.2f}x | {r['write_lmarch_s']:.2f} "
            f"| {r['write_gensim_s']:.2f} | {r['write_speedup']:.2f}x |"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "words": words,
                    "dim": args.dim,
                    "repeats": repeats,
                    "results": results,
                    "gensim_version": gensim.__version__,
                    "torch_version": torch.__version__,
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "load_average": os.getloadavg(),
                }
            )
        )


if __name__ == "__main__":
    main()
