"""word2vec: skip-gram and CBOW with negative sampling (Mikolov et al. 2013a, "Efficient
Estimation of Word Representations in Vector Space"; 2013b, "Distributed Representations of Words
and Phrases and their Compositionality"), trained in torch.

Two tables: input vectors ``W`` (the word vectors kept at the end, initialised uniform in
``±1/d`` as gensim 4 does; word2vec.c uses ``±0.5/d``) and output vectors ``U`` (zeros). For an
input word ``w`` predicting an output word ``o`` with ``K`` negatives ``n_k`` drawn from the
unigram distribution raised to 3/4, negative sampling maximises

    log σ(U_o · W_w) + Σ_k log σ(−U_{n_k} · W_w)

by plain SGD, as word2vec.c and gensim do: with ``g = α (label − σ(U_t · W_w))`` for each target
``t`` (label 1 for ``o``, 0 for the negatives), ``U_t += g W_w`` and ``W_w += Σ_t g U_t``.

- skip-gram: each context word (input) predicts the centre word (output), as word2vec.c pairs them;
- CBOW: the mean of the context vectors is the input, the centre word the output, and each
  context vector receives the whole input gradient (gensim's ``cbow_mean=1``);
- dynamic window: at each position the window is ``window − b`` with ``b`` uniform in
  ``[0, window)``, so near words count more; windows stay inside a sentence;
- subsampling: a word of count ``f`` among ``total`` is kept with probability
  ``(sqrt(f / (s·total)) + 1) · s·total / f`` (``s`` = ``sample``), before windows are formed;
- learning rate: linear from ``alpha`` to ``min_alpha`` over all epochs' words.

Speed: rather than one pair at a time (word2vec.c's Hogwild loop), the updates are vectorised over
the pairs of ``batch_words`` consecutive centre words (a few thousand pairs): gather their rows,
compute the gradient above by hand, and ``index_add_`` it back. Written by hand rather than taken
by autograd on ``nn.Embedding(sparse=True)`` + SGD, which would record a graph for gathers whose
results are thrown away and coalesce (sort) its sparse gradients before applying them (reasoned,
not timed).
Words repeated within a batch add their updates, which is what the sequential loop does to first
order; at 1,024 centres per batch the scores match gensim's (tests), while at 8,192 training
diverged (measured). Two ways to draw negatives:

- ``shared_negatives=0`` (default): K negatives per pair, word2vec's sampling exactly;
- ``shared_negatives=N``: N negatives drawn once per batch and shared by all its pairs, each
  weighted K/N, so the expected gradient is unchanged; the products become two matrix
  multiplications (1.4x faster for CBOW, 2.3x for skip-gram in ``benchmarks/word2vec.py``).

On a shared 2-core machine one torch thread runs these small updates 2-20x faster than two (the
threads wait on each other; measured), hence ``threads`` in :meth:`Word2Vec.train`. gensim's compiled loop
stays faster: ``benchmarks/word2vec.py`` reports the ratio.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from lmarch.classic.vectors import WordVectors
from lmarch.errors import LmarchError


@dataclass
class Word2VecConfig:
    """Training settings; defaults are gensim's ``Word2Vec`` defaults except ``sg`` (skip-gram,
    the 2013b paper's model)."""

    sg: bool = True
    vector_size: int = 100
    window: int = 5
    negative: int = 5
    sample: float = 1e-3
    min_count: int = 5
    epochs: int = 5
    alpha: float = 0.025
    min_alpha: float = 0.0001
    ns_exponent: float = 0.75
    seed: int = 1
    batch_words: int = 1024  # centre positions per vectorised update
    # 0: K negatives drawn for every pair (word2vec's sampling); N > 0: N negatives drawn once
    # per update and shared by all its pairs, each weighted K/N (faster: two matrix products)
    shared_negatives: int = 0

    def validate(self) -> None:
        """Refuse settings that cannot train (by name)."""
        for name in ("vector_size", "window", "min_count", "epochs", "batch_words"):
            if getattr(self, name) < 1:
                raise LmarchError(f"word2vec {name} must be at least 1, got {getattr(self, name)}")
        if self.shared_negatives < 0:
            raise LmarchError(
                f"word2vec shared_negatives must be >= 0, got {self.shared_negatives}"
            )
        if self.negative < 1:
            raise LmarchError(
                f"word2vec negative must be at least 1, got {self.negative}",
                hint="only negative sampling is implemented (no hierarchical softmax)",
            )
        if self.alpha <= 0:
            raise LmarchError(f"word2vec alpha must be positive, got {self.alpha}")
        if self.sample < 0 or self.min_alpha < 0:
            raise LmarchError("word2vec sample and min_alpha must be non-negative")


@dataclass
class Vocabulary:
    """Words kept by ``min_count``, most frequent first (ties by first appearance), and counts."""

    words: list[str]
    counts: list[int]

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], min_count: int) -> Vocabulary:
        """Count every word and keep those seen at least ``min_count`` times."""
        counter = Counter(word for sentence in sentences for word in sentence)
        kept = [(w, c) for w, c in counter.items() if c >= min_count]  # first-appearance order
        kept.sort(key=lambda item: -item[1])  # stable: ties keep first appearance
        return cls([w for w, _ in kept], [c for _, c in kept])


def keep_probabilities(counts: torch.Tensor, sample: float) -> torch.Tensor:
    """word2vec's subsampling: keep a word of count f with probability
    ``min(1, (sqrt(f / (s·total)) + 1) · s·total / f)``, total the kept vocabulary's count."""
    counts = counts.to(torch.float64)
    if sample <= 0:
        return torch.ones_like(counts)
    threshold = sample * counts.sum()
    return (((counts / threshold).sqrt() + 1) * threshold / counts).clamp(max=1.0)


def negative_table(counts: torch.Tensor, exponent: float, size: int = 1 << 22) -> torch.Tensor:
    """word2vec.c's unigram table: ``size`` slots, word i filling a share ``count_i^exponent /
    Σ count^exponent`` of them, so a uniform slot is a draw from that distribution."""
    cumulative = (counts.to(torch.float64) ** exponent).cumsum(0)
    slots = (torch.arange(size, dtype=torch.float64) + 0.5) / size * cumulative[-1]
    return torch.searchsorted(cumulative, slots).clamp_(max=counts.numel() - 1).to(torch.int32)


class Word2Vec:
    """A word2vec model: vocabulary, input vectors ``W`` and output vectors ``U``."""

    def __init__(self, vocab: Vocabulary, config: Word2VecConfig) -> None:
        config.validate()
        self.vocab = vocab
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        size, d = len(vocab.words), config.vector_size
        self.input = (torch.rand(size, d, generator=generator) * 2 - 1) / d
        self.output = torch.zeros(size, d)
        self.index = {w: i for i, w in enumerate(vocab.words)}

    @property
    def vectors(self) -> WordVectors:
        """The trained word vectors (the input table)."""
        return WordVectors(self.vocab.words, self.input.clone())

    def encode(self, sentences: Iterable[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ids of the in-vocabulary words, flat, and each one's sentence number (words outside
        the vocabulary are dropped, which widens the window over them, as gensim does)."""
        ids: list[int] = []
        sentence_of: list[int] = []
        for number, sentence in enumerate(sentences):
            rows = [self.index[w] for w in sentence if w in self.index]
            ids.extend(rows)
            sentence_of.extend([number] * len(rows))
        return torch.tensor(ids, dtype=torch.long), torch.tensor(sentence_of, dtype=torch.long)

    def train(
        self,
        sentences: Sequence[Sequence[str]],
        progress: Callable[[int, int], None] | None = None,
        threads: int | None = None,
    ) -> dict:
        """Train for ``config.epochs`` passes; ``progress(done, total)`` is called with the words
        processed so far. Returns ``{"words", "seconds", "words_per_s"}``, words counting the
        in-vocabulary words of all epochs before subsampling (gensim's count).

        ``threads`` sets torch's intra-op threads for the run (restored after): the updates are
        small, and on a loaded 2-core machine one thread measured several times faster than two.
        """
        previous = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            return self._train(sentences, progress)
        finally:
            torch.set_num_threads(previous)

    def _train(
        self, sentences: Sequence[Sequence[str]], progress: Callable[[int, int], None] | None
    ) -> dict:
        config = self.config
        ids, sentence_of = self.encode(sentences)
        if ids.numel() == 0:
            raise LmarchError(
                "no word of the corpus is in the vocabulary", hint="lower --min-count"
            )
        generator = torch.Generator().manual_seed(config.seed + 1)
        counts = torch.tensor(self.vocab.counts, dtype=torch.float64)
        keep = keep_probabilities(counts, config.sample)
        table = negative_table(counts, config.ns_exponent)
        total = ids.numel() * config.epochs
        start = time.perf_counter()
        for epoch in range(config.epochs):
            kept = torch.rand(ids.numel(), generator=generator, dtype=torch.float64) < keep[ids]
            # the raw position of each kept word: the learning rate decays with raw words read
            raw_position = kept.nonzero().squeeze(1)
            self._train_epoch(
                ids[kept],
                sentence_of[kept],
                raw_position + epoch * ids.numel(),
                total,
                table,
                generator,
                progress,
            )
        seconds = time.perf_counter() - start
        if progress is not None:
            progress(total, total)
        return {"words": total, "seconds": seconds, "words_per_s": total / max(seconds, 1e-9)}

    def _train_epoch(
        self,
        ids: torch.Tensor,
        sentence_of: torch.Tensor,
        done_before: torch.Tensor,
        total: int,
        table: torch.Tensor,
        generator: torch.Generator,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        config = self.config
        n = ids.numel()
        reduced = torch.randint(0, config.window, (n,), generator=generator)
        for start in range(0, n, config.batch_words):
            stop = min(start + config.batch_words, n)
            context, valid = context_windows(sentence_of, reduced, config.window, start, stop)
            alpha = learning_rate(config, float(done_before[start]) / total)
            centres = ids[start:stop]
            if config.sg:
                rows, cols = valid.nonzero(as_tuple=True)
                inputs, mask, targets = ids[context[rows, cols]], None, centres[rows]
            else:
                has_context = valid.any(dim=1)
                inputs, mask = ids[context[has_context]], valid[has_context]
                targets = centres[has_context]
            if targets.numel():
                shape = (config.shared_negatives,)
                if config.shared_negatives == 0:
                    shape = (targets.numel(), config.negative)
                self.update(inputs, mask, targets, _draw(table, shape, generator), alpha)
            if progress is not None:
                progress(int(done_before[stop - 1]) + 1, total)

    def update(
        self,
        inputs: torch.Tensor,
        input_mask: torch.Tensor | None,
        targets: torch.Tensor,
        negatives: torch.Tensor,
        alpha: float,
    ) -> None:
        """One vectorised SGD step on B pairs, all gradients taken at the current tables.

        Skip-gram: ``inputs`` is [B] rows of W. CBOW: ``inputs`` is [B, 2w] rows with
        ``input_mask`` marking the real context words; their mean is the input, and each of them
        receives the whole input gradient. ``negatives`` is [B, K] (drawn per pair) or [N]
        (shared by all pairs, each weighted K/N). A negative equal to its pair's target is
        skipped, as in word2vec.c.
        """
        if input_mask is None:
            hidden = self.input.index_select(0, inputs)  # [B, d]
        else:
            # the mean of each centre's real context rows, gathered and averaged in one kernel
            counts = input_mask.sum(1)
            offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
            hidden = torch.nn.functional.embedding_bag(
                inputs[input_mask], self.input, offsets, mode="mean"
            )
        if negatives.dim() == 2:
            # the target and its K negatives as one block of 1+K output rows per pair
            rows = torch.cat([targets[:, None], negatives], dim=1)  # [B, 1+K]
            out = self.output.index_select(0, rows.reshape(-1)).view(*rows.shape, -1)
            g = (out * hidden[:, None, :]).sum(2).sigmoid_().mul_(-alpha)
            g[:, 0] += alpha  # label 1 for the target: g = α (label − σ)
            g[:, 1:].masked_fill_(negatives == targets[:, None], 0.0)
            hidden_grad = (g[:, :, None] * out).sum(1)
            out_grad = (g[:, :, None] * hidden[:, None, :]).reshape(-1, hidden.shape[1])
            self.output.index_add_(0, rows.reshape(-1), out_grad)
        else:
            positive = self.output.index_select(0, targets)  # [B, d]
            g_pos = (1.0 - torch.sigmoid((hidden * positive).sum(1))) * alpha  # [B]
            negative = self.output.index_select(0, negatives)  # [N, d]
            scale = -alpha * self.config.negative / negatives.numel()
            g_neg = torch.sigmoid(hidden @ negative.T).mul_(scale)
            g_neg.masked_fill_(negatives[None, :] == targets[:, None], 0.0)  # [B, N]
            hidden_grad = torch.addmm(g_pos[:, None] * positive, g_neg, negative)
            self.output.index_add_(0, negatives, g_neg.T @ hidden)
            self.output.index_add_(0, targets, g_pos[:, None] * hidden)
        if input_mask is None:
            self.input.index_add_(0, inputs, hidden_grad)
        else:
            per_word = hidden_grad.repeat_interleave(counts, dim=0)
            self.input.index_add_(0, inputs[input_mask], per_word)

    def config_dict(self) -> dict:
        """The settings as plain values (saved beside the vectors)."""
        return asdict(self.config)


def context_windows(
    sentence_of: torch.Tensor, reduced: torch.Tensor, window: int, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Context positions of the centres ``start..stop-1`` of a (subsampled) word stream:
    ``context`` [B, 2 window] holds positions ``i-window..i-1, i+1..i+window`` (clamped), ``valid``
    marks those within the centre's dynamic window ``window - reduced[i]`` and its sentence."""
    n = sentence_of.numel()
    offsets = torch.cat([torch.arange(-window, 0), torch.arange(1, window + 1)])
    positions = torch.arange(start, stop)
    context = positions[:, None] + offsets
    inside = (context >= 0) & (context < n)
    context = context.clamp(0, n - 1)
    valid = (
        inside
        & (offsets.abs() <= (window - reduced[start:stop])[:, None])
        & (sentence_of[context] == sentence_of[positions][:, None])
    )
    return context, valid


def learning_rate(config: Word2VecConfig, progress: float) -> float:
    """Linear decay: ``alpha - (alpha - min_alpha) * progress``, progress in [0, 1] the share of
    all epochs' words already read (gensim's schedule)."""
    return max(config.alpha - (config.alpha - config.min_alpha) * progress, config.min_alpha)


def _draw(table: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Negative words: uniform slots of the unigram table."""
    slots = torch.randint(0, table.numel(), shape, generator=generator)
    return table[slots].long()


def train_word2vec(
    sentences: Sequence[Sequence[str]],
    config: Word2VecConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
    threads: int | None = None,
) -> tuple[Word2Vec, dict]:
    """Build the vocabulary of ``sentences`` (lists of words) and train word2vec on them.

    Returns the model and the training statistics of :meth:`Word2Vec.train` plus
    ``"vocabulary"`` (its size).
    """
    config = config or Word2VecConfig()
    config.validate()
    if not any(sentences):
        raise LmarchError("the corpus holds no words", hint="give a text file with some words")
    vocab = Vocabulary.build(sentences, config.min_count)
    if not vocab.words:
        raise LmarchError(
            f"no word occurs {config.min_count} times or more in the corpus",
            hint="lower --min-count or give a larger corpus",
        )
    model = Word2Vec(vocab, config)
    stats = model.train(sentences, progress, threads)
    stats["vocabulary"] = len(vocab.words)
    return model, stats


__all__ = [
    "Vocabulary",
    "Word2Vec",
    "Word2VecConfig",
    "context_windows",
    "learning_rate",
    "keep_probabilities",
    "negative_table",
    "train_word2vec",
]
