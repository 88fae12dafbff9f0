"""Exact held-out loss: every token of a split scored once, in consecutive windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def evaluate_tokens(
    model: nn.Module, tokens: Tensor, block_size: int, batch_size: int = 32
) -> dict[str, float]:
    """Mean next-token cross-entropy over all of ``tokens`` and its perplexity exp(loss).

    The stream is cut into consecutive windows of ``block_size + 1`` tokens overlapping by one,
    so every token after the first is predicted exactly once (with the context available inside
    its window). Returns ``loss``, ``perplexity`` and ``tokens`` (how many were scored).
    """
    if len(tokens) < 2:
        raise ValueError("need at least two tokens to evaluate")
    model.eval()
    device = next(model.parameters()).device
    starts = list(range(0, len(tokens) - 1, block_size))
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        chunk = [tokens[s : s + block_size + 1] for s in starts[i : i + batch_size]]
        full = [c for c in chunk if len(c) == block_size + 1]
        pieces = ([torch.stack(full)] if full else []) + [
            c[None] for c in chunk if len(c) < block_size + 1
        ]
        for windows in pieces:
            windows = windows.to(device).long()
            logits = model(windows[:, :-1])
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), windows[:, 1:].flatten(), reduction="sum"
            )
            total += loss.item()
            count += windows[:, 1:].numel()
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


@torch.no_grad()
def evaluate_streams(
    model: nn.Module, tokens: Tensor, block_size: int, streams: int = 16
) -> dict[str, float]:
    """Mean next-token cross-entropy over ``tokens`` for a model that carries a state (a
    recurrent LM), scored as it is trained: the tokens are cut into ``streams`` contiguous
    streams read side by side in windows of ``block_size``, the state of each stream carried
    from one window into the next (``model.make_cache`` / ``cache=``). Every token but the
    first of each stream is predicted once; the last ``(len - 1) % streams`` are left out so the
    streams are equal. Returns ``loss``, ``perplexity`` and ``tokens``."""
    length = (len(tokens) - 1) // streams
    if length < 1:
        raise ValueError(f"need more than {streams} tokens to evaluate {streams} streams")
    model.eval()
    device = next(model.parameters()).device
    rows = torch.arange(streams)[:, None] * length
    state = model.make_cache(streams)
    total, count = 0.0, 0
    for start in range(0, length, block_size):
        span = torch.arange(start, min(start + block_size, length) + 1)
        window = tokens[rows + span].to(device).long()
        logits = model(window[:, :-1], cache=state)
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), window[:, 1:].flatten(), reduction="sum"
        ).item()
        count += window[:, 1:].numel()
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}
