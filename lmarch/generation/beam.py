"""Beam search, batched over prompts x beams, for decoder-only and encoder-decoder models.

Beam search keeps, for each prompt, the ``K`` partial sequences ``y_1..t`` with the highest
summed log-probability ``sum_i log p(y_i | y_<i, x)`` and extends all of them by one token per
step (Graves 2012, "Sequence Transduction with Recurrent Neural Networks"; Sutskever et al.
2014). A sequence that ends (an end-of-sequence token, or the length limit) leaves the beam for
a list of ``K`` finished hypotheses, ranked by the length-normalised score of Wu et al. 2016
("Google's Neural Machine Translation System", section 7, without their constant 5)::

    score(y) = sum_i log p(y_i | y_<i, x) / |y| ** length_penalty

with ``|y|`` the number of generated tokens (the end token included). ``length_penalty > 0``
favours longer sequences, ``< 0`` shorter ones, ``0`` is the plain sum.

The bookkeeping follows Hugging Face ``transformers``' ``generate(num_beams=K)`` (5.x), so
that the two give the same tokens and scores:

- each step scores the ``2K`` best (beam, token) continuations (``(1 + #eos) K`` with several
  end tokens), so that at least ``K`` of them do not end and the beam stays full;
- the ``K`` best continuations that do not end form the next beams; of the ``K`` best overall,
  those that end are offered to the finished list, which keeps the ``K`` best scores;
- ``early_stopping`` says when a prompt is done: ``True`` as soon as ``K`` hypotheses are
  finished; ``False`` when, in addition, the best running beam divided by the *current*
  length's penalty cannot beat the worst finished one (a heuristic: with a positive length
  penalty a longer sequence could still win); ``"never"`` uses the best length still possible
  (``max_new_tokens``) when the length penalty is positive, which is the exact criterion;
- the scores are float32 log-softmaxes of the logits, whatever the model's dtype.

Constraints on each step's log-probabilities, in this order: no repeated n-gram (the trigram
avoidance of Paulus et al. 2017, "A Deep Reinforced Model for Abstractive Summarization", for
any n: a token that would repeat an n-gram of the sequence, prompt included, is banned), a minimum of ``min_new_tokens`` before an end token, a forced first token
(``forced_bos_token_id``, applied when the sequence so far is one token long: an
encoder-decoder's start token) and a forced last one (``forced_eos_token_id`` at the last step).

The step interface
------------------
The search never touches a model directly; it calls an object with two methods
(:class:`BeamDecoder`), whose rows are the ``B * K`` sequences, prompt-major (row ``b * K + k``
is beam ``k`` of prompt ``b``)::

    step(input_ids: Tensor, start: int) -> Tensor
        input_ids [B*K, T] sit at positions start .. start+T-1; the decoder stores their keys
        and values in its cache and returns the logits of the last position, [B*K, V].
        The first call passes the whole prompt (start = 0), every later one the newest token.
    reorder_cache(indices: Tensor) -> None
        indices [B*K] (int64): new row i continues old row indices[i]; the self-attention
        cache is permuted along its batch dimension (:meth:`KVCache.reorder`). A row's new
        parent is always a beam of the same prompt, so anything computed once per prompt
        (an encoder's output, cross-attention keys/values repeated over beams) needs no reorder.

:class:`CausalBeamDecoder` adapts any lmarch decoder-only model (``forward(ids, cache=,
start=, last_only=)``, ``make_cache``, ``max_positions``); encoder-decoders are stepped by
:class:`lmarch.generation.seq2seq.EncoderDecoderStepper` (sources encoded once, cross-attention
keys and values repeated ``num_beams`` times on the batch dimension), and
:func:`lmarch.generation.seq2seq.seq2seq_beam_search` starts every decoder from the model's
decoder start token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.generation.sampling import SamplingConfig

__all__ = [
    "BeamDecoder",
    "BeamSearchConfig",
    "BeamSearchOutput",
    "CausalBeamDecoder",
    "Hypothesis",
    "beam_search",
    "beam_search_prompts",
    "check_beam_sampling",
    "constrain_log_probs",
]

# The score of a slot that holds nothing (an empty finished slot, a beam that may not
# continue). A large finite number, not -inf, as in transformers: adding it to a real score
# still ranks the two, and ties among empty slots are broken by position, not by NaN.
_EMPTY = -1.0e9


class BeamDecoder(Protocol):
    """What beam search needs from a model: logits for the next token, and a cache it can
    reorder (see the module docstring)."""

    def step(self, input_ids: Tensor, start: int) -> Tensor:
        """Logits [N, V] of the last of ``input_ids`` [N, T] (positions ``start ..``)."""
        ...

    def reorder_cache(self, indices: Tensor) -> None:
        """Make row ``i`` of the cache a copy of old row ``indices[i]``."""
        ...


@dataclass
class BeamSearchConfig:
    """Settings of one beam search, named as in ``transformers.GenerationConfig``."""

    num_beams: int = 4
    max_new_tokens: int = 20
    min_new_tokens: int = 0  # no end token before this many new tokens
    length_penalty: float = 1.0  # exponent of the length in score = sum log p / len ** lp
    early_stopping: bool | str = False  # True, False or "never" (see the module docstring)
    no_repeat_ngram_size: int = 0  # 0: off
    num_return_sequences: int = 1  # best hypotheses returned per prompt (<= num_beams)
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None  # fills ended sequences (see fill_token_id)
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    # token sequences never to complete: the last id of each is banned after the others
    bad_words_ids: Sequence[Sequence[int]] = ()
    renormalize_logits: bool = False  # log-softmax again after the constraints (HF's option)

    def __post_init__(self) -> None:
        for name in ("num_beams", "max_new_tokens", "num_return_sequences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LmarchError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("min_new_tokens", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LmarchError(f"{name} must be an integer >= 0, got {value!r}")
        if isinstance(self.length_penalty, bool) or not (
            isinstance(self.length_penalty, (int, float)) and math.isfinite(self.length_penalty)
        ):
            raise LmarchError(
                f"length_penalty must be a finite number, got {self.length_penalty!r}"
            )
        if self.num_return_sequences > self.num_beams:
            raise LmarchError(
                f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams "
                f"({self.num_beams})",
                hint="beam search returns at most one sequence per beam",
            )
        if not any(self.early_stopping is v for v in (True, False)) and (
            self.early_stopping != "never"
        ):
            raise LmarchError(
                f"early_stopping must be True, False or 'never', got {self.early_stopping!r}"
            )
        try:
            self.bad_words_ids = tuple(tuple(int(i) for i in w) for w in self.bad_words_ids)
        except (TypeError, ValueError):
            raise LmarchError(
                f"bad_words_ids must be lists of token ids, got {self.bad_words_ids!r}"
            ) from None
        if any(not w for w in self.bad_words_ids):
            raise LmarchError("bad_words_ids holds an empty sequence")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = (self.eos_token_id,)
        elif self.eos_token_id is not None:
            self.eos_token_id = tuple(int(i) for i in self.eos_token_id)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The end-of-sequence ids (possibly none)."""
        return tuple(self.eos_token_id or ())  # type: ignore[arg-type]

    @property
    def fill_token_id(self) -> int:
        """What follows the end of a sequence shorter than the longest returned: the pad id,
        except that a pad id of 0 (or none) gives the first end id — transformers' rule (it
        tests the pad id for truth), kept so that whole outputs compare equal."""
        if self.eos_ids:
            return self.pad_token_id or self.eos_ids[0]
        return self.pad_token_id or 0


@dataclass
class BeamSearchOutput:
    """``sequences`` [B*R, T + L]: prompt then generated ids (R = ``num_return_sequences``, best
    first per prompt; shorter ones filled with ``fill_token_id``); ``scores`` [B*R] their
    length-penalised log-probabilities (``transformers``' ``sequences_scores``); ``lengths`` [B*R]
    how many ids each generated (its end token included)."""

    sequences: Tensor
    scores: Tensor
    lengths: Tensor


@dataclass(frozen=True)
class Hypothesis:
    """One finished sequence: its new token ids (end token included) and its score."""

    token_ids: tuple[int, ...]
    score: float


def check_beam_sampling(sampling: SamplingConfig) -> None:
    """Refuse sampling settings that beam search would silently ignore (it keeps the likeliest
    sequences; it does not draw tokens)."""
    given = []
    if sampling.temperature != 0:
        given.append(f"temperature {sampling.temperature:g}")
    for name in ("top_k", "top_p", "min_p"):
        if getattr(sampling, name) is not None:
            given.append(f"{name} {getattr(sampling, name)}")
    if sampling.repetition_penalty != 1.0:
        given.append(f"repetition_penalty {sampling.repetition_penalty:g}")
    if given:
        raise LmarchError(
            f"beam search does not sample: {', '.join(given)} cannot be combined with num_beams > 1",
            hint="use --temperature 0 (and no top-k/top-p/min-p/repetition penalty) with "
            "--num-beams, or --num-beams 1 to sample",
        )


def _ban_repeated_ngrams(log_probs: Tensor, seqs: Tensor, n: int) -> Tensor:
    """Set to -inf every token that would complete an n-gram already present in its row."""
    length = seqs.shape[1]
    if length < n:  # no complete n-gram yet
        return log_probs
    windows = seqs.unfold(1, n, 1)  # [N, W, n]: every n-gram of the row
    tail = seqs[:, length - n + 1 :]  # the last n-1 tokens: the n-gram the next token completes
    match = (windows[:, :, :-1] == tail[:, None, :]).all(-1)  # [N, W]
    hits = torch.zeros_like(log_probs).scatter_add_(1, windows[:, :, -1], match.to(log_probs.dtype))
    return log_probs.masked_fill(hits > 0, float("-inf"))


def _ban_bad_words(log_probs: Tensor, seqs: Tensor, bad_words: Sequence[Sequence[int]]) -> Tensor:
    """Set to -inf the last token of every bad word whose other tokens end the row."""
    banned = torch.zeros_like(log_probs, dtype=torch.bool)
    for word in bad_words:
        *head, last = word
        if not head:
            banned[:, last] = True
        elif seqs.shape[1] >= len(head):
            ends = (seqs[:, seqs.shape[1] - len(head) :] == seqs.new_tensor(head)).all(-1)
            banned[:, last] |= ends
    return log_probs.masked_fill(banned, float("-inf"))


def constrain_log_probs(
    log_probs: Tensor, seqs: Tensor, new_tokens: int, max_len: int, config: BeamSearchConfig
) -> Tensor:
    """Apply the step constraints to ``log_probs`` [N, V] of the rows ``seqs`` [N, T]
    (``new_tokens`` of which were generated; the sequence may reach ``max_len``): no repeated
    n-gram, no bad word, no end token before ``min_new_tokens``, forced first and last
    tokens, and with ``renormalize_logits`` a log-softmax over what is left (Hugging Face's
    processor order)."""
    length = seqs.shape[1]
    if config.no_repeat_ngram_size > 0:
        log_probs = _ban_repeated_ngrams(log_probs, seqs, config.no_repeat_ngram_size)
    if config.bad_words_ids:
        log_probs = _ban_bad_words(log_probs, seqs, config.bad_words_ids)
    if new_tokens < config.min_new_tokens and config.eos_ids:
        log_probs = log_probs.clone()
        log_probs[:, list(config.eos_ids)] = float("-inf")
    forced = None
    if config.forced_bos_token_id is not None and length == 1:
        forced = config.forced_bos_token_id
    if config.forced_eos_token_id is not None and length == max_len - 1:
        forced = config.forced_eos_token_id
    if forced is not None:
        log_probs = torch.full_like(log_probs, float("-inf"))
        log_probs[:, forced] = 0.0
    if config.renormalize_logits:
        log_probs = F.log_softmax(log_probs, dim=-1)
    return log_probs


def _take(x: Tensor, index: Tensor) -> Tensor:
    """Rows of ``x`` [B, M, ...] picked per prompt by ``index`` [B, K] -> [B, K, ...]."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(x, index, dim=1)


@torch.no_grad()
def beam_search(
    decoder: BeamDecoder, prompt_ids: Tensor, config: BeamSearchConfig
) -> BeamSearchOutput:
    """Beam search from ``prompt_ids`` [B, T] (every prompt the same length: a decoder-only
    model's prompt, or an encoder-decoder's start token), stepping ``decoder`` (rows = B * K,
    prompt-major). See the module docstring for the scores and the stopping rule."""
    c = config
    k = c.num_beams
    b, t0 = prompt_ids.shape
    device = prompt_ids.device
    max_len = t0 + c.max_new_tokens
    eos = torch.tensor(c.eos_ids, dtype=torch.long, device=device)
    n_candidates = max(2, 1 + len(c.eos_ids)) * k
    in_top_k = torch.arange(n_candidates, device=device) < k  # only these may finish

    # running beams: all copies of the prompt, only the first live (else the same token
    # would be chosen K times in the first step)
    seqs = torch.full((b, k, max_len), c.fill_token_id, dtype=torch.long, device=device)
    seqs[:, :, :t0] = prompt_ids[:, None, :]
    run_scores = torch.full((b, k), _EMPTY, dtype=torch.float32, device=device)
    run_scores[:, 0] = 0.0
    # finished hypotheses: K slots per prompt, empty at first
    fin_seqs = seqs.clone()
    fin_scores = torch.full((b, k), _EMPTY, dtype=torch.float32, device=device)
    fin_full = torch.zeros((b, k), dtype=torch.bool, device=device)
    fin_lens = torch.zeros((b, k), dtype=torch.long, device=device)
    may_improve = torch.ones((b, 1), dtype=torch.bool, device=device)
    row_offset = torch.arange(b, device=device)[:, None] * k

    logits = decoder.step(seqs[:, :, :t0].reshape(b * k, t0), 0)
    cur = t0
    while True:
        flat = seqs[:, :, :cur].reshape(b * k, cur)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        log_probs = constrain_log_probs(log_probs, flat, cur - t0, max_len, c)
        vocab = log_probs.shape[-1]
        total = (log_probs.view(b, k, vocab) + run_scores[:, :, None]).view(b, k * vocab)

        # the best continuations of all beams together
        cand_scores, cand = torch.topk(total, n_candidates)
        parent, token = cand // vocab, cand % vocab
        cand_seqs = _take(seqs, parent)
        cand_seqs[:, :, cur] = token
        ends = torch.isin(token, eos) | (cur + 1 >= max_len)

        # next beams: the K best that go on
        keep_scores = cand_scores + ends.float() * _EMPTY
        keep = torch.topk(keep_scores, k).indices
        next_seqs, next_scores = _take(cand_seqs, keep), _take(keep_scores, keep)
        next_parent = _take(parent, keep)

        # finished list: those among the K best that end, length-penalised
        gen_len = cur + 1 - t0
        offered = cand_scores / (gen_len**c.length_penalty)
        closed = fin_full.all(1, keepdim=True) & (c.early_stopping is True)
        offered = offered + closed.float() * _EMPTY + (~may_improve).float() * _EMPTY
        new_finished = ends & in_top_k[None, :]
        offered = offered + (~new_finished).float() * _EMPTY
        merged_scores = torch.cat([fin_scores, offered], dim=1)
        best = torch.topk(merged_scores, k).indices
        fin_seqs = _take(torch.cat([fin_seqs, cand_seqs], dim=1), best)
        fin_scores = _take(merged_scores, best)
        fin_full = _take(torch.cat([fin_full, new_finished], dim=1), best)
        new_lens = torch.full_like(token, gen_len)
        fin_lens = _take(torch.cat([fin_lens, new_lens], dim=1), best)

        seqs, run_scores = next_seqs, next_scores
        cur += 1
        may_improve = may_improve & _may_improve(run_scores, fin_scores, fin_full, cur - t0, c)
        if (
            not bool(may_improve.any())
            or (bool(fin_full.all()) and c.early_stopping is True)
            or bool(ends.all())
        ):
            break
        decoder.reorder_cache((next_parent + row_offset).reshape(-1))
        logits = decoder.step(seqs[:, :, cur - 1].reshape(b * k, 1), cur - 1)

    r = c.num_return_sequences
    lengths = fin_lens[:, :r].reshape(-1)
    width = t0 + int(lengths.max())
    return BeamSearchOutput(
        sequences=fin_seqs[:, :r, :width].reshape(b * r, width),
        scores=fin_scores[:, :r].reshape(-1),
        lengths=lengths,
    )


def _may_improve(
    run_scores: Tensor, fin_scores: Tensor, fin_full: Tensor, gen_len: int, c: BeamSearchConfig
) -> Tensor:
    """[B, 1]: whether the best running beam of each prompt could still beat its worst finished
    hypothesis (always, while fewer than K are finished)."""
    if c.early_stopping == "never" and c.length_penalty > 0.0:
        gen_len = c.max_new_tokens  # the longest it may grow: the best its penalty can be
    best_running = run_scores[:, :1] / (gen_len**c.length_penalty)
    worst_finished = torch.where(fin_full, fin_scores.min(dim=1, keepdim=True).values, _EMPTY)
    return (best_running > worst_finished).any(dim=-1, keepdim=True)


class CausalBeamDecoder:
    """:class:`BeamDecoder` over an lmarch decoder-only model and its static :class:`KVCache`,
    sized for ``rows`` sequences of up to ``max_len`` tokens."""

    def __init__(self, model: nn.Module, rows: int, max_len: int) -> None:
        self.model = model
        self.cache = model.make_cache(rows, max_len)
        self.length = 0

    def step(self, input_ids: Tensor, start: int) -> Tensor:
        """The model's logits for the last of ``input_ids``, written into the cache."""
        self.length = start + input_ids.shape[1]
        return self.model(input_ids, cache=self.cache, start=start, last_only=True)[:, -1]

    def reorder_cache(self, indices: Tensor) -> None:
        """Permute the cached keys/values (only the positions written so far)."""
        self.cache.reorder(indices, self.length)


def beam_search_prompts(
    model: nn.Module, prompts: Sequence[Sequence[int]], config: BeamSearchConfig
) -> list[list[Hypothesis]]:
    """Beam search for each of ``prompts`` (token ids, any lengths) with an lmarch decoder-only
    model; the best ``num_return_sequences`` hypotheses of each, best first.

    lmarch's decoder-only models take one position range per batch (no per-row positions for
    left padding), so prompts are batched by length: each group of equal-length prompts is one
    batched search over prompts x beams.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmarchError("beam search needs at least one non-empty prompt")
    limit = model.max_positions
    longest = max(len(p) for p in prompts)
    if longest + config.max_new_tokens - 1 > limit:
        raise LmarchError(
            f"a prompt of {longest} tokens plus {config.max_new_tokens} new ones exceeds the "
            f"model's context of {limit} positions",
            hint="shorten the prompt or lower --max-new-tokens (beam search does not slide "
            "the window)",
        )
    device = next(model.parameters()).device
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    results: list[list[Hypothesis]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for length, members in groups.items():
            ids = torch.tensor([list(prompts[i]) for i in members], dtype=torch.long, device=device)
            rows = len(members) * config.num_beams
            decoder = CausalBeamDecoder(model, rows, length + config.max_new_tokens - 1)
            out = beam_search(decoder, ids, config)
            r = config.num_return_sequences
            for j, i in enumerate(members):
                for q in range(j * r, (j + 1) * r):
                    n = int(out.lengths[q])
                    new = out.sequences[q, length : length + n].tolist()
                    results[i].append(Hypothesis(tuple(new), float(out.scores[q])))
    finally:
        model.train(was_training)
    return results
