"""BERT: a bidirectional Transformer encoder (Devlin et al. 2019), and the variants built on it.

    e_t = LN(W_tok[x_t] + W_pos[p_t] + W_type[s_t])       word + position + segment embeddings
    h_0 = e W_proj  (only with a factorised embedding)     E -> H projection (ALBERT, ELECTRA)
    h_l = Block(h_{l-1}),  l = 1..L                        post-LN blocks, attention sees both sides
    pooled = tanh(h_L[CLS] W_pool + b_pool)                sentence vector for classification

Every position attends to every real token (pad keys are masked out), so a token's state depends
on its whole sentence — the encoder is trained by masked-language modelling instead of next-token
prediction. The variants differ only in config fields (``variant`` and a few shapes):

- RoBERTa (Liu et al. 2019): one token type; positions start at pad_token_id + 1 and count only
  non-pad tokens, so a padded sentence gets the same positions as an unpadded one.
- ALBERT (Lan et al. 2020): factorised embeddings (V x E, then E -> H with E << H) and cross-layer
  sharing: ``n_layer_groups`` distinct blocks, layer l using block floor(l / (L / G)).
- ELECTRA (Clark et al. 2020): an E -> H embedding projection when E != H, no pooler; the
  discriminator scores each token as original or replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmarch.models.bert_heads import DenseHead, EncoderWithHead, MaskedLMHead, split_span_logits
from lmarch.models.validate import (
    ConfigError,
    check_bool,
    check_choice,
    check_divides,
    check_flash_dropout,
    check_fraction,
    check_int,
    check_optional_int,
    check_positive,
)
from lmarch.nn import (
    MLP,
    LayerNorm,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    TransformerBlock,
    padding_mask,
)
from lmarch.nn.attention import ATTENTION_IMPLEMENTATIONS
from lmarch.nn.ffn import ACTIVATIONS
from lmarch.nn.init import init_normal
from lmarch.nn.pooling import pool

VARIANTS = ("bert", "roberta", "albert", "electra")


@dataclass
class BertConfig:
    """BERT-family hyper-parameters; defaults are BERT-base (110M, Devlin et al. 2019, sec. 3).

    ``embedding_size`` set means a factorised embedding of that width followed by a projection
    to ``n_embd`` (ALBERT always has the projection, ELECTRA only when the widths differ).
    ``n_layer_groups`` set means ALBERT-style sharing: that many distinct blocks for ``n_layer``
    layers. ``add_pooler`` keeps the tanh pooler on the bare encoder (heads that do not use it
    build the encoder without it, as the Hugging Face checkpoints do).
    """

    vocab_size: int = 30522
    block_size: int = 512  # rows of the position table (RoBERTa: 514, two of them unused)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int = 3072
    type_vocab_size: int = 2
    embedding_size: int | None = None
    n_layer_groups: int | None = None
    variant: str = "bert"
    activation: str = "gelu"  # exact erf GELU, as BERT's released code
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1  # on embeddings, attention weights and every residual branch
    pad_token_id: int = 0
    add_pooler: bool = True
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        name = "BertConfig"
        check_choice(name, "variant", self.variant, VARIANTS)
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "intermediate_size"):
            check_int(name, key, getattr(self, key))
        check_int(name, "type_vocab_size", self.type_vocab_size)
        check_divides(name, "n_embd", self.n_embd, "n_head", self.n_head)
        check_optional_int(name, "embedding_size", self.embedding_size)
        check_optional_int(name, "n_layer_groups", self.n_layer_groups)
        if self.n_layer_groups is not None and self.n_layer_groups > self.n_layer:
            raise ConfigError(
                f"{name}.n_layer_groups must be in 1..n_layer ({self.n_layer}), "
                f"got {self.n_layer_groups}",
                "n_layer_groups",
            )
        check_choice(name, "activation", self.activation, sorted(ACTIVATIONS))
        check_positive(name, "layer_norm_eps", self.layer_norm_eps)
        check_fraction(name, "dropout", self.dropout)
        if self.variant == "roberta" or self.pad_token_id is not None:
            check_int(name, "pad_token_id", self.pad_token_id, low=0)
            if self.pad_token_id >= self.vocab_size:
                raise ConfigError(
                    f"{name}.pad_token_id must be in 0..vocab_size-1 ({self.vocab_size - 1}), "
                    f"got {self.pad_token_id}",
                    "pad_token_id",
                )
        if self.max_positions < 1:
            raise ConfigError(
                f"{name}.block_size must exceed pad_token_id + 1 ({self.position_offset}) for "
                f"RoBERTa, got {self.block_size}",
                "block_size",
            )
        check_bool(name, "add_pooler", self.add_pooler)
        check_choice(name, "attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        check_flash_dropout(name, self.attention, self.dropout)

    @property
    def embedding_dim(self) -> int:
        """Width of the token/position/type tables (E)."""
        return self.embedding_size or self.n_embd

    @property
    def n_blocks(self) -> int:
        """Number of distinct blocks (parameter sets) in the encoder."""
        return self.n_layer_groups or self.n_layer

    @property
    def position_offset(self) -> int:
        """First position id of a real token: pad_token_id + 1 for RoBERTa, 0 otherwise."""
        return self.pad_token_id + 1 if self.variant == "roberta" else 0

    @property
    def max_positions(self) -> int:
        """Longest sequence the position table covers."""
        return self.block_size - self.position_offset


def _init_weights(*modules: nn.Module) -> None:
    """BERT's initialisation, N(0, 0.02^2) with zero biases — skipped on the meta device."""
    for module in modules:
        if next(module.parameters()).device.type != "meta":
            module.apply(init_normal)


def roberta_position_ids(input_ids: Tensor, pad_token_id: int) -> Tensor:
    """Position ids counting only non-pad tokens, starting at pad_token_id + 1; pads get
    pad_token_id (Liu et al. 2019's fairseq convention): p_t = pad + m_t * sum_{s<=t} m_s."""
    real = (input_ids != pad_token_id).long()
    return torch.cumsum(real, dim=1) * real + pad_token_id


class BertModel(nn.Module):
    """The encoder: ids [B, T] (with a 0/1 padding mask and segment ids) -> states [B, T, H]."""

    def __init__(self, config: BertConfig, add_pooler: bool | None = None) -> None:
        super().__init__()
        self.config = c = config
        e = c.embedding_dim
        self.tok_emb = nn.Embedding(c.vocab_size, e)
        self.pos_emb = LearnedPositionalEmbedding(c.block_size, e)
        self.type_emb = nn.Embedding(c.type_vocab_size, e)
        self.norm_emb = LayerNorm(e, c.layer_norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.emb_proj = nn.Linear(e, c.n_embd) if c.embedding_size is not None else None
        self.blocks = nn.ModuleList(
            TransformerBlock(
                attn=MultiHeadAttention(
                    c.n_embd,
                    c.n_head,
                    dropout=c.dropout,
                    causal=False,
                    implementation=c.attention,
                ),
                ffn=MLP(c.n_embd, c.intermediate_size, c.activation, dropout=c.dropout),
                norm_attn=LayerNorm(c.n_embd, c.layer_norm_eps),
                norm_ffn=LayerNorm(c.n_embd, c.layer_norm_eps),
                pre_norm=False,
            )
            for _ in range(c.n_blocks)
        )
        use_pooler = c.add_pooler if add_pooler is None else add_pooler
        self.pooler = nn.Linear(c.n_embd, c.n_embd) if use_pooler else None
        _init_weights(self)

    @property
    def max_positions(self) -> int:
        """Longest sequence the position table covers."""
        return self.config.max_positions

    def block_for_layer(self, layer: int) -> TransformerBlock:
        """The block applied at ``layer``: its own, or its group's shared one (ALBERT)."""
        return self.blocks[int(layer / (self.config.n_layer / len(self.blocks)))]

    def position_ids(self, input_ids: Tensor) -> Tensor:
        """Absolute positions 0..T-1, or RoBERTa's pad-aware ones; [B or 1, T]."""
        c = self.config
        if c.variant == "roberta":
            return roberta_position_ids(input_ids, c.pad_token_id)
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """h_0: summed, normalised embeddings (projected to the hidden width if factorised)."""
        if input_ids.shape[1] > self.config.max_positions:
            raise ValueError(
                f"sequence of {input_ids.shape[1]} tokens exceeds the {self.config.max_positions}"
                " positions of this model"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.tok_emb(input_ids) + self.type_emb(token_type_ids)
        x = self.drop(self.norm_emb(x + self.pos_emb(self.position_ids(input_ids))))
        return x if self.emb_proj is None else self.emb_proj(x)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Last hidden states [B, T, H]; ``attention_mask`` is 1 for real tokens, 0 for pads."""
        x = self.embed(input_ids, token_type_ids)
        mask = padding_mask(attention_mask) if attention_mask is not None else None
        for layer in range(self.config.n_layer):
            x = self.block_for_layer(layer)(x, attention_mask=mask)
        return x

    def pooled(self, hidden: Tensor) -> Tensor:
        """BERT's sentence vector tanh(h[CLS] W + b) [B, H] (next-sentence / SOP / classifiers)."""
        if self.pooler is None:
            raise RuntimeError("this encoder was built without a pooler")
        return torch.tanh(self.pooler(hidden[:, 0]))


def _mlm_head(config: BertConfig, bert: BertModel) -> MaskedLMHead:
    # RoBERTa's and ELECTRA's heads use GELU whatever the encoder's activation is
    act = config.activation if config.variant in ("bert", "albert") else "gelu"
    head = MaskedLMHead(
        config.n_embd, config.embedding_dim, config.vocab_size, act, config.layer_norm_eps
    )
    head.decoder.weight = bert.tok_emb.weight  # output embeddings tied to the input ones
    return head


class BertForMaskedLM(EncoderWithHead):
    """Masked-LM model (Devlin et al. 2019, sec. 3.1, task 1): logits [B, T, V] for every
    position; the loss is taken where the input was masked. Also ELECTRA's generator."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, BertModel(config, add_pooler=False))
        self.mlm = _mlm_head(config, self.bert)
        _init_weights(self.mlm)

    def score(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Vocabulary logits [B, T, V]."""
        return self.mlm(hidden)


class BertForSequenceClassification(EncoderWithHead):
    """Sentence(-pair) classifier [B, num_labels]. BERT and ALBERT classify the pooled [CLS]
    vector with one linear layer (Devlin et al. 2019, sec. 4.1: softmax(C W^T)); RoBERTa and
    ELECTRA use a two-layer head on the first token's state (tanh and GELU respectively)."""

    def __init__(self, config: BertConfig, num_labels: int) -> None:
        uses_pooler = config.variant in ("bert", "albert")
        super().__init__(config, BertModel(config, add_pooler=uses_pooler))
        self.num_labels, self.uses_pooler = num_labels, uses_pooler
        if self.uses_pooler:
            self.dropout = nn.Dropout(config.dropout)
            self.classifier: nn.Module = nn.Linear(config.n_embd, num_labels)
        else:
            act = "tanh" if config.variant == "roberta" else "gelu"
            self.classifier = DenseHead(config.n_embd, num_labels, act, config.dropout)
        _init_weights(self.classifier)

    def score(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Class logits [B, num_labels]."""
        if self.uses_pooler:
            return self.classifier(self.dropout(self.bert.pooled(hidden)))
        return self.classifier(hidden[:, 0])


class BertForPooledClassification(EncoderWithHead):
    """The classifier ``lmarch classify train`` fine-tunes: logits = W dropout(c) + b, where c
    pools the encoder's last states as the encoder was trained to be used (the mean over real
    tokens for a Sentence-BERT model, the [CLS] state otherwise), [B, num_labels]. The
    encoder is given (a pretrained one), and its tanh pooler, unused here, is dropped."""

    def __init__(
        self, encoder: BertModel, num_labels: int, pooling: str = "cls", dropout: float = 0.1
    ) -> None:
        super().__init__(encoder.config, encoder)
        if encoder.pooler is not None:
            encoder.pooler = None
        self.num_labels, self.pooling = num_labels, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.n_embd, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def score(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Class logits [B, num_labels]."""
        return self.head(self.dropout(pool(hidden, attention_mask, self.pooling)))


class BertForTokenClassification(EncoderWithHead):
    """Per-token classifier (tagging, NER; Devlin et al. 2019, sec. 5.3): [B, T, num_labels]."""

    def __init__(self, config: BertConfig, num_labels: int) -> None:
        super().__init__(config, BertModel(config, add_pooler=False))
        self.num_labels = num_labels
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.n_embd, num_labels)
        _init_weights(self.classifier)

    def score(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Tag logits [B, T, num_labels]."""
        return self.classifier(self.dropout(hidden))


class BertForQuestionAnswering(EncoderWithHead):
    """Extractive QA (SQuAD; Devlin et al. 2019, sec. 4.2): a start and an end vector score every
    token, and the answer is the span [i, j] maximising S.T_i + E.T_j."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, BertModel(config, add_pooler=False))
        self.qa = nn.Linear(config.n_embd, 2)
        _init_weights(self.qa)

    def score(self, hidden: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(start logits [B, T], end logits [B, T])."""
        return split_span_logits(self.qa(hidden))


class ElectraForPreTraining(EncoderWithHead):
    """ELECTRA's discriminator (Clark et al. 2020, sec. 2): for every token, the logit that it
    was replaced by the generator, D(x, t) = sigmoid(w^T act(W h_t)); output [B, T]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, BertModel(config, add_pooler=False))
        self.discriminator = DenseHead(config.n_embd, 1, config.activation)
        _init_weights(self.discriminator)

    def score(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Replaced-token-detection logits [B, T]."""
        return self.discriminator(hidden).squeeze(-1)


class AlbertForPreTraining(EncoderWithHead):
    """ALBERT's two pre-training heads (Lan et al. 2020, sec. 3.1): masked-LM logits [B, T, V]
    and sentence-order prediction logits [B, 2] from the pooled [CLS] vector (were the two
    segments swapped?)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, BertModel(config, add_pooler=True))
        self.mlm = _mlm_head(config, self.bert)
        self.dropout = nn.Dropout(config.dropout)
        self.sop = nn.Linear(config.n_embd, 2)
        _init_weights(self.mlm, self.sop)

    def score(self, hidden: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(masked-LM logits [B, T, V], sentence-order logits [B, 2])."""
        return self.mlm(hidden), self.sop(self.dropout(self.bert.pooled(hidden)))


__all__ = [
    "VARIANTS",
    "AlbertForPreTraining",
    "BertConfig",
    "BertForMaskedLM",
    "BertForPooledClassification",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "ElectraForPreTraining",
    "roberta_position_ids",
]
