"""Recurrent language models: an Elman RNN, LSTM or GRU stack between an embedding and a softmax
(Mikolov et al. 2010 for the RNN LM; Zaremba et al. 2014 for the regularised LSTM LM).

    e_t = W_e[x_t]                                     token embedding
    h_t^l = Cell(h_t^{l-1}, h_{t-1}^l),  l = 1..L      h_t^0 = e_t; cells in lmarch.nn.recurrent
    p(x_{t+1} | x_<=t) = softmax(W_o h_t^L + b_o)      W_o may be tied to W_e (Press & Wolf 2017)

Dropout (Zaremba et al. 2014) acts on the embeddings, between layers and before the head, never
on the recurrent connections. The whole past lives in the state h_t, so the decoding "cache" is
just that state (:class:`~lmarch.nn.recurrent.RecurrentState`): every new token costs the same.
Training cuts the sequence into windows of ``block_size`` tokens and carries the state from one
window to the next without back-propagating into it (truncated BPTT, Williams & Peng 1990;
:mod:`lmarch.train.tbptt`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmarch.models.validate import (
    ConfigError,
    check_bool,
    check_choice,
    check_fraction,
    check_int,
)
from lmarch.nn.recurrent import CELLS, Recurrent, RecurrentState

# cell name -> the mode of lmarch.nn.recurrent.Recurrent that runs it
CELL_MODES = {"lstm": "lstm", "gru": "gru", "rnn": "rnn_tanh", "rnn_relu": "rnn_relu"}
# The state has no position limit, but generation and evaluation read text in windows of
# ``max_positions`` tokens: this many keeps the cost of a window's cold start small (an
# lstm-char-small run scored 2.1028 nats a token on the bundled plays in windows, 2.1023 in one
# pass) while an evaluation runs 32 windows side by side instead of one long stream.
CONTEXT_WINDOW = 4096
# a longer input is read in pieces of this many tokens, the state carried from one to the next:
# the same function, with memory bounded by the piece
READ_CHUNK = 1024


@dataclass
class RNNConfig:
    """Recurrent LM hyper-parameters; defaults are Zaremba et al. 2014's "medium" LSTM (2
    layers of 650 units, dropout 0.5, unrolled 35 steps, 10k-word vocabulary).

    ``cell`` is ``lstm``, ``gru``, ``rnn`` (Elman, tanh) or ``rnn_relu``; ``block_size`` is
    the truncated-BPTT length; ``tie_weights`` shares the output matrix with the embedding,
    which needs ``n_embd == hidden_size``."""

    cell: str = "lstm"
    vocab_size: int = 10000
    n_embd: int = 650
    hidden_size: int = 650
    n_layer: int = 2
    dropout: float = 0.5
    block_size: int = 35
    tie_weights: bool = False

    def __post_init__(self) -> None:
        name = "RNNConfig"
        check_choice(name, "cell", self.cell, list(CELL_MODES))
        for field_name in ("vocab_size", "n_embd", "hidden_size", "n_layer", "block_size"):
            check_int(name, field_name, getattr(self, field_name))
        check_fraction(name, "dropout", self.dropout)
        check_bool(name, "tie_weights", self.tie_weights)
        if self.tie_weights and self.n_embd != self.hidden_size:
            raise ConfigError(
                f"RNNConfig.tie_weights needs n_embd == hidden_size, got {self.n_embd} and "
                f"{self.hidden_size}",
                "tie_weights",
                hint="set n_embd to hidden_size, or tie_weights=false",
            )

    @property
    def gates(self) -> int:
        """Gate blocks per weight matrix: 4 (LSTM), 3 (GRU), 1 (Elman)."""
        return CELLS[CELL_MODES[self.cell]][0]


def rnn_parameter_count(config: RNNConfig) -> int:
    """Parameters of :class:`RecurrentLM` for ``config``, counted from the shapes:
    V E (embedding) + sum_l G H (I_l + H + 2) (each layer: W_ih, W_hh and two biases, with
    I_0 = E and I_l = H above) + H V + V (head; H V shared with the embedding when tied)."""
    c = config
    gh = c.gates * c.hidden_size
    layers = sum(
        gh * ((c.n_embd if k == 0 else c.hidden_size) + c.hidden_size + 2) for k in range(c.n_layer)
    )
    head = c.vocab_size + (0 if c.tie_weights else c.hidden_size * c.vocab_size)
    return c.vocab_size * c.n_embd + layers + head


def config_for_budget(n_params: int, **fields) -> RNNConfig:
    """The :class:`RNNConfig` with ``fields`` (cell, vocab_size, n_layer, ...) whose hidden size
    is the largest that keeps the model within ``n_params`` parameters. Unless ``n_embd`` is
    given it follows the hidden size (as tied weights need)."""
    fixed_embd = "n_embd" in fields

    def build(hidden: int) -> RNNConfig:
        embd = fields["n_embd"] if fixed_embd else hidden
        return RNNConfig(**{**fields, "hidden_size": hidden, "n_embd": embd})

    if rnn_parameter_count(build(1)) > n_params:
        raise ConfigError(
            f"no recurrent model of this shape fits in {n_params:,} parameters "
            f"(hidden size 1 already has {rnn_parameter_count(build(1)):,})",
            "hidden_size",
        )
    low, high = 1, 2
    while rnn_parameter_count(build(high)) <= n_params:
        low, high = high, high * 2
    while high - low > 1:  # the count grows with the hidden size: bisect
        mid = (low + high) // 2
        low, high = (mid, high) if rnn_parameter_count(build(mid)) <= n_params else (low, mid)
    return build(low)


class RecurrentLM(nn.Module):
    """Embedding -> recurrent stack -> linear head. ``forward`` maps ids [B, T] to next-token
    logits [B, T, V], continuing from (and updating) the state in ``cache`` when given."""

    def __init__(self, config: RNNConfig) -> None:
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.rnn = Recurrent(
            CELL_MODES[c.cell], c.n_embd, c.hidden_size, c.n_layer, dropout=c.dropout,
            batch_first=True,
        )  # fmt: skip
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size)
        if c.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        if self.tok_emb.weight.device.type != "meta":
            # small uniform embeddings and head, as Zaremba et al. (and PyTorch's word LM) start
            nn.init.uniform_(self.tok_emb.weight, -0.1, 0.1)
            nn.init.zeros_(self.lm_head.bias)
            if not c.tie_weights:
                nn.init.uniform_(self.lm_head.weight, -0.1, 0.1)

    @property
    def max_positions(self) -> int:
        """The window generation and evaluation read at once (:data:`CONTEXT_WINDOW`); the
        state itself summarises any length of text."""
        return CONTEXT_WINDOW

    def make_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> RecurrentState:
        """The zero state for ``batch_size`` rows (``max_len`` does not matter: the state has
        the same size after any number of tokens)."""
        weight = self.tok_emb.weight
        like = torch.empty(0, dtype=dtype or weight.dtype, device=weight.device)
        return RecurrentState(self.rnn.initial_state(batch_size, like))

    def forward(
        self,
        input_ids: Tensor,
        *,
        cache: RecurrentState | None = None,
        start: int | Tensor = 0,
        attention_mask: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits [B, T, vocab] for ids [B, T] (with ``last_only``, [B, 1, vocab]). With
        ``cache`` the stack starts from its state and leaves its final state there; without,
        from zeros. ``start`` is accepted for the decoders' common interface and unused: a
        recurrent model has no positions. Inputs longer than :data:`READ_CHUNK` are read in
        pieces, the state carried across."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("a recurrent LM reads every token in order; it takes no padding mask")
        state = cache.state if cache is not None else None
        pieces = input_ids.split(READ_CHUNK, dim=1)
        logits = []
        for i, piece in enumerate(pieces):
            out, state = self.rnn(self.drop(self.tok_emb(piece)), state)
            if last_only:
                out = out[:, -1:]
            if not last_only or i == len(pieces) - 1:
                logits.append(self.lm_head(self.drop(out)))
        if cache is not None:
            cache.state = state
        return logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)


__all__ = [
    "CELL_MODES",
    "RNNConfig",
    "RecurrentLM",
    "config_for_budget",
    "rnn_parameter_count",
]
