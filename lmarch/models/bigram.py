"""The bigram language model: the simplest neural LM, a baseline for every other family.

    p(x_{t+1} = j | x_t = i) = softmax(W[i])_j,   W in R^{V x V}

Each token's logits for the next token are one row of a learned table; no context beyond the
current token. Trained with the same loss and Trainer as GPT, it shows what attention buys.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lmarch.models.validate import check_int


@dataclass
class BigramConfig:
    """Only the vocabulary matters; ``block_size`` is the training context length."""

    vocab_size: int = 65
    block_size: int = 64

    def __post_init__(self) -> None:
        check_int("BigramConfig", "vocab_size", self.vocab_size)
        check_int("BigramConfig", "block_size", self.block_size)


class BigramLM(nn.Module):
    """Logits for the next token looked up from the current token's row of a V x V table."""

    def __init__(self, config: BigramConfig) -> None:
        super().__init__()
        self.config = config
        self.table = nn.Embedding(config.vocab_size, config.vocab_size)
        nn.init.normal_(self.table.weight, std=0.02)

    @property
    def max_positions(self) -> int:
        """A bigram model has no position limit; report the training context for generation."""
        return self.config.block_size

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> None:
        """Nothing to cache: the prediction depends on the last token only."""
        return None

    def forward(
        self,
        input_ids: Tensor,
        *,
        cache=None,
        start: int = 0,
        attention_mask=None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits [B, T, V] for ids [B, T]."""
        return self.table(input_ids[:, -1:] if last_only else input_ids)
