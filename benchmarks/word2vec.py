"""word2vec: lmarch's torch trainer against gensim 4.4's compiled one, same corpus and settings.

Both train on the bundled Shakespeare (38 plays; lower-cased words, one sentence per line) with
the same settings (gensim's defaults: 100 dimensions, window 5, 5 negatives, sample 1e-3,
min_count 5, 5 epochs, alpha 0.025 -> 0.0001), skip-gram and CBOW. Each repeat uses another seed.
Reported per trainer: median training seconds over the repeats (vocabulary building included on
both sides) and words/s (in-vocabulary words of all epochs, gensim's count), the ratio of medians
against gensim with 2 workers and with 1, and the evaluation scores averaged over the repeats:
analogy accuracy on the questions of ``questions-words.txt`` whose words are all in the
vocabulary, and Spearman's rho on the WordSim-353 and SimLex-999 pairs inside it.

lmarch runs with one torch thread (``threads=1``; on these shared 2-core machines one thread is
faster than two, see lmarch.classic.word2vec) in two modes: ``exact`` (K negatives drawn per
pair, as word2vec) and ``shared`` (64 negatives per update shared by its pairs).

    python benchmarks/word2vec.py [--repeats 3] [--models sg,cbow] [--tiny] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import gensim
import torch

from lmarch.classic.word2vec import Vocabulary, Word2VecConfig, train_word2vec
from lmarch.tasks.word2vec import corpus_sentences, evaluate_vectors, train_gensim


def scores_row(scores: dict) -> dict:
    """The three headline numbers of :func:`evaluate_vectors`."""
    return {
        "analogy_accuracy": scores["analogies"]["accuracy"],
        "analogy_correct": scores["analogies"]["correct"],
        "analogy_total": scores["analogies"]["total"],
        "wordsim353_spearman": scores["wordsim353"]["spearman"],
        "wordsim353_pairs": scores["wordsim353"]["pairs"],
        "simlex999_spearman": scores["simlex999"]["spearman"],
        "simlex999_pairs": scores["simlex999"]["pairs"],
    }


def run(trainer, sentences, config: Word2VecConfig, repeats: int) -> dict:
    """Train ``repeats`` times (seed 1, 2, ...); median seconds and mean scores."""
    times, rows = [], []
    for repeat in range(repeats):
        seed_config = Word2VecConfig(**{**config.__dict__, "seed": repeat + 1})
        start = time.perf_counter()
        vectors = trainer(sentences, seed_config)
        times.append(time.perf_counter() - start)
        rows.append(scores_row(evaluate_vectors(vectors)))
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    return {"median_s": statistics.median(times), "runs_s": times, **mean, "per_seed": rows}


def lmarch_trainer(shared: int):
    def train(sentences, config):
        config.shared_negatives = shared
        model, _ = train_word2vec(sentences, config, threads=1)
        return model.vectors

    return train


def gensim_trainer(workers: int):
    return lambda sentences, config: train_gensim(sentences, config, workers)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="sg,cbow", help="comma list of sg, cbow")
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument("--tiny", action="store_true", help="tinyshakespeare, 1 epoch, 1 repeat")
    parser.add_argument("--json", action="store_true", help="print one JSON object as last line")
    args = parser.parse_args()
    data, repeats, epochs = args.data, args.repeats, 5
    if args.tiny:
        data, repeats, epochs = "tinyshakespeare", 1, 1
    sentences = corpus_sentences(data)
    trainers = {
        "lmarch exact": lmarch_trainer(0),
        "lmarch shared-64": lmarch_trainer(64),
        "gensim workers=2": gensim_trainer(2),
        "gensim workers=1": gensim_trainer(1),
    }
    results: dict = {}
    for model in args.models.split(","):
        if model not in ("sg", "cbow"):
            raise SystemExit(f"unknown model {model!r}: sg or cbow")
        config = Word2VecConfig(sg=model == "sg", epochs=epochs)
        # in-vocabulary words of all epochs, the count both trainers read
        words = sum(Vocabulary.build(sentences, config.min_count).counts) * epochs
        results[model] = {}
        for name, trainer in trainers.items():
            row = run(trainer, sentences, config, repeats)
            row["words_per_s"] = words / row["median_s"]
            results[model][name] = row
        for row in results[model].values():
            for workers in (2, 1):
                peer = results[model][f"gensim workers={workers}"]["words_per_s"]
                row[f"speed_vs_gensim{workers}"] = row["words_per_s"] / peer

    print(f"word2vec on {data}: {len(sentences):,} sentences, {repeats} seeds, {epochs} epochs")
    print()
    print(
        "| model | trainer | words/s | s (median) | vs gensim w=2 | vs gensim w=1 "
        "| analogies | WordSim-353 rho | SimLex-999 rho |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model, rows in results.items():
        for name, r in rows.items():
            print(
                f"| {model} | {name} | {r['words_per_s']:,.0f} | {r['median_s']:.1f} "
                f"| {r['speed_vs_gensim2']:.2f}x | {r['speed_vs_gensim1']:.2f}x "
                f"| {100 * r['analogy_accuracy']:.2f}% ({r['analogy_correct']:.1f}/"
                f"{r['analogy_total']:.0f}) | {r['wordsim353_spearman']:.3f} "
                f"| {r['simlex999_spearman']:.3f} |"
            )
    if args.json:
        print(
            json.dumps(
                {
                    "data": data,
                    "repeats": repeats,
                    "epochs": epochs,
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
