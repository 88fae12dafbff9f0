"""Output heads that sit on top of a BERT-family encoder.

Masked-LM head (Devlin et al. 2019, appendix A): each position's state is transformed and scored
against the word embeddings it was read from,

    logits_t = LN(act(h_t W_d + b_d)) E^T + b_v,        E: the [V, E_dim] word embeddings

where E_dim is the hidden width for BERT/RoBERTa and the smaller embedding width for ALBERT and the
ELECTRA generator (the head projects down before scoring).

Every task model is :class:`EncoderWithHead`: an encoder ``bert`` (states [B, T, H]) and a head
that turns those states into the task's output, forward(x) = score(bert(x), mask).

Dense head: act(x W_1 + b_1) W_2 + b_2 — RoBERTa's and ELECTRA's sentence classifiers applied to
the first token (tanh for RoBERTa, GELU for ELECTRA) and ELECTRA's replaced-token detector applied
to every token (Clark et al. 2020, eq. in sec. 2: D(x, t) = sigmoid(w^T h_t)).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lmarch.nn import LayerNorm, get_activation


class EncoderWithHead(nn.Module):
    """The one base of the BERT-family task models: ``bert`` maps ids [B, T] (with a 0/1
    padding mask and segment ids) to states [B, T, H], and :meth:`score` maps those states to
    the task's output. The encoder keeps the name ``bert`` in every task model, so weights and
    checkpoints name it the same way whatever the head."""

    def __init__(self, config: Any, encoder: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.bert = encoder

    @property
    def encoder(self) -> nn.Module:
        """The bare encoder under the head (what sentence embeddings and fine-tuning use)."""
        return self.bert

    def score(self, hidden: Tensor, attention_mask: Tensor | None) -> Any:
        """The head: the task's output from the encoder's last states [B, T, H]."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Any:
        """score(bert(input_ids, attention_mask, token_type_ids), attention_mask)."""
        return self.score(self.bert(input_ids, attention_mask, token_type_ids), attention_mask)


class MaskedLMHead(nn.Module):
    """dense (H -> E) -> activation -> LayerNorm(E) -> decoder (E -> V, weight tied by the owner)."""

    def __init__(
        self, dim: int, embedding_dim: int, vocab_size: int, activation: str, eps: float
    ) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, embedding_dim)
        self.act = get_activation(activation)
        self.norm = LayerNorm(embedding_dim, eps)
        self.decoder = nn.Linear(embedding_dim, vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        """[B, T, H] -> [B, T, V] logits."""
        return self.decoder(self.norm(self.act(self.dense(hidden))))


class DenseHead(nn.Module):
    """dropout -> dense (H -> H) -> activation -> dropout -> out_proj (H -> n_out)."""

    def __init__(self, dim: int, n_out: int, activation: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(dim, dim)
        self.act = get_activation(activation)
        self.out_proj = nn.Linear(dim, n_out)

    def forward(self, x: Tensor) -> Tensor:
        """[..., H] -> [..., n_out]."""
        return self.out_proj(self.dropout(self.act(self.dense(self.dropout(x)))))


def split_span_logits(logits: Tensor) -> tuple[Tensor, Tensor]:
    """[B, T, 2] span scores -> (start logits [B, T], end logits [B, T]) for extractive QA
    (Devlin et al. 2019, sec. 4.2: P(start = i) = softmax_i(S . T_i))."""
    start, end = logits.unbind(dim=-1)
    return start.contiguous(), end.contiguous()


__all__ = ["DenseHead", "EncoderWithHead", "MaskedLMHead", "split_span_logits"]
