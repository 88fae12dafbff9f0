"""n-gram language models: lmarch's vectorised counts against nltk.lm, then lmarch alone at scale.

The corpus is the bundled Shakespeare (38 plays), split as `lmarch train` splits it (last 10% of
every play for validation), in word tokens, one sentence per line. Each side trains a model and
scores validation tokens (every token and each line's end, the line padded with <s> as nltk's
`padded_everygram_pipeline` pads it); the time is training + scoring, the median over repeats.

1. Laplace (add-1) word 3-gram, trained on the first `--laplace-train` tokens, scoring the whole
   validation split. nltk's Laplace scores by dictionary lookups, so this compares counting.
2. Interpolated Kneser-Ney word 3-gram with nltk's discount 0.1, trained on `--kn-train`
   tokens, scoring `--kn-val` tokens: nltk rescans every n-gram for each probability (its
   continuation counts are not stored), so it is kept small.
   For both, lmarch runs its nltk-compatible mode, and the largest difference between the two
   sides' probabilities of the scored tokens is reported (they compute the same model).
3. lmarch alone: modified Kneser-Ney 5-grams (words, then characters) on the whole train split,
   scoring the whole validation split: train and score times, perplexity and bits per character.

    python benchmarks/ngram.py [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import nltk
import numpy as np
from nltk.lm import KneserNeyInterpolated, Laplace
from nltk.lm.preprocessing import pad_both_ends, padded_everygram_pipeline

from lmarch.classic.ngram import NgramConfig, NgramLM, tokenize
from lmarch.data.corpus import load_documents, train_val_split


def first_tokens(sentences: list[list[str]], n: int) -> list[list[str]]:
    """The leading sentences holding at least ``n`` tokens in all (or all of them)."""
    out, count = [], 0
    for s in sentences:
        if count >= n:
            break
        out.append(s)
        count += len(s)
    return out


def nltk_run(model_cls, order: int, train, val, **kwargs) -> np.ndarray:
    """Train an nltk.lm model and return p of every scored validation token."""
    model = model_cls(order=order, **kwargs)
    ngrams, vocab = padded_everygram_pipeline(order, train)
    model.fit(ngrams, vocab)
    probs = []
    for s in val:
        padded = list(pad_both_ends(s, n=order))
        for i in range(order - 1, len(s) + order):
            probs.append(model.score(padded[i], padded[i - order + 1 : i]))
    return np.array(probs)


def lmarch_run(config: NgramConfig, train, val) -> np.ndarray:
    """The same with lmarch: counts vectorised, all validation tokens scored at once."""
    with np.errstate(divide="ignore"):
        return np.exp(NgramLM.fit(train, config).log_probs(val))


def timed(fn, repeats: int):
    """(median seconds, every run's seconds, last result) of ``fn()``."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def peer_case(name, nltk_fn, lmarch_fn, repeats: int, tokens: tuple[int, int]) -> dict:
    ours_s, ours_all, ours = timed(lmarch_fn, repeats)
    peer_s, peer_all, peer = timed(nltk_fn, repeats)
    positive = peer > 0
    return {
        "case": name,
        "train_tokens": tokens[0],
        "scored_tokens": tokens[1],
        "lmarch_s": round(ours_s, 4),
        "nltk_s": round(peer_s, 4),
        "speedup_nltk_over_lmarch": round(peer_s / ours_s, 1),
        "lmarch_runs_s": [round(t, 4) for t in ours_all],
        "nltk_runs_s": [round(t, 4) for t in peer_all],
        "max_abs_prob_diff": float(np.abs(ours - peer).max()),
        "zero_prob_tokens": int((~positive).sum()),
        "perplexity_of_nonzero": float(np.exp(-np.log(peer[positive]).mean())),
    }


def scale_case(unit: str, train: str, val: str, repeats: int) -> dict:
    config = NgramConfig(order=5, smoothing="mkn", unit=unit)
    train_s, train_all, model = timed(lambda: NgramLM.fit_text(train, config), repeats)
    eval_s, eval_all, score = timed(lambda: model.evaluate_text(val), repeats)
    return {
        "case": f"lmarch 5-gram modified KN, {unit}s, whole corpus",
        "unit": unit,
        "train_s": round(train_s, 3),
        "eval_s": round(eval_s, 3),
        "train_runs_s": [round(t, 3) for t in train_all],
        "eval_runs_s": [round(t, 3) for t in eval_all],
        "ngrams_per_order": [len(k) for k in model.keys],
        "vocab_size": len(model.vocab),
        **score.as_dict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--laplace-train", type=int, default=100_000, help="train tokens")
    parser.add_argument("--kn-train", type=int, default=20_000, help="train tokens")
    parser.add_argument("--kn-val", type=int, default=500, help="validation tokens scored")
    parser.add_argument("--json", action="store_true", help="print one JSON object as last line")
    args = parser.parse_args()

    train_text, val_text = train_val_split(load_documents("shakespeare"), 0.1)
    train, val = tokenize(train_text, "word"), tokenize(val_text, "word")

    lap_train = first_tokens(train, args.laplace_train)
    lap_tokens = (sum(map(len, lap_train)), sum(len(s) + 1 for s in val))
    laplace = peer_case(
        "word 3-gram Laplace",
        lambda: nltk_run(Laplace, 3, lap_train, val),
        lambda: lmarch_run(NgramConfig(3, "addk", k=1.0, nltk_compat=True), lap_train, val),
        args.repeats,
        lap_tokens,
    )
    kn_train, kn_val = first_tokens(train, args.kn_train), first_tokens(val, args.kn_val)
    kn_tokens = (sum(map(len, kn_train)), sum(len(s) + 1 for s in kn_val))
    kn = peer_case(
        "word 3-gram Kneser-Ney (d=0.1)",
        lambda: nltk_run(KneserNeyInterpolated, 3, kn_train, kn_val, discount=0.1),
        lambda: lmarch_run(NgramConfig(3, "kn", discount=0.1, nltk_compat=True), kn_train, kn_val),
        args.repeats,
        kn_tokens,
    )
    scale = [scale_case(unit, train_text, val_text, args.repeats) for unit in ("word", "char")]

    result = {
        "peers": [laplace, kn],
        "lmarch_whole_corpus": scale,
        "train_characters": len(train_text),
        "val_characters": len(val_text),
        "repeats": args.repeats,
        "nltk_version": nltk.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }

    print("n-gram training + scoring of the validation split, Shakespeare (38 plays), words")
    print()
    print(
        "| model | train tokens | scored tokens | lmarch s | nltk s | nltk / lmarch | max abs p diff |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in (laplace, kn):
        print(
            f"| {row['case']} | {row['train_tokens']:,} | {row['scored_tokens']:,} | "
            f"{row['lmarch_s']:.3f} | {row['nltk_s']:.2f} | {row['speedup_nltk_over_lmarch']}x | "
            f"{row['max_abs_prob_diff']:.1e} |"
        )
    print()
    print("| lmarch, whole corpus | train s | score s | val tokens | perplexity | bits/char |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in scale:
        ppl = row["perplexity"] if math.isfinite(row["perplexity"]) else float("inf")
        print(
            f"| 5-gram mod. KN, {row['unit']}s | {row['train_s']:.2f} | {row['eval_s']:.2f} | "
            f"{row['tokens']:,} | {ppl:.2f} | {row['bits_per_char']:.3f} |"
        )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
