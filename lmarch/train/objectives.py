"""Pre-training objectives for bidirectional encoders, as loss functions the one Trainer calls.

Masked LM (Devlin et al. 2019, sec. 3.1): with M the set of chosen positions (see
:mod:`lmarch.data.masking`),

    L_MLM = -1/|M| sum_{t in M} log p(x_t | x_masked)

Replaced-token detection (ELECTRA; Clark et al. 2020, sec. 2): a small generator G is trained
with L_MLM; at each masked position a token is *sampled* from G, x^_t ~ p_G(x_t | x_masked),
giving the corrupted sequence x_corrupt. The discriminator D then classifies every real token
as original or replaced:

    L_Disc = -1/n sum_t [ 1(x_corrupt_t = x_t) log(1 - D(x_corrupt, t))
                          + 1(x_corrupt_t != x_t) log D(x_corrupt, t) ]
    L = L_MLM(G) + lambda L_Disc(D),  lambda = 50

A sampled token that happens to equal the original counts as original. No gradient flows
through the sampling; generator and discriminator share their token, position and type
embeddings (the paper's sec. 3.2 finding), and the discriminator is what is kept afterwards.

Encoder-decoders (T5, the Transformer, BART / Marian) train on ``(source, target)`` batches
with the teacher-forced cross-entropy -1/|y| sum_t log p(y_t | y_<t, x)
(:class:`lmarch.models.transformer.Seq2SeqLoss`); the objective only says where the pairs
come from: ``span`` (T5's span corruption), ``denoise`` (BART's text infilling + sentence
permutation; :mod:`lmarch.data.noising`) or ``seq2seq`` (given pairs;
:mod:`lmarch.data.seq2seq`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.data.masking import IGNORE_INDEX, MaskingConfig
from lmarch.models.bert import BertConfig, BertForMaskedLM, ElectraForPreTraining
from lmarch.models.heads import build_bert_task_model, encoder_of
from lmarch.models.registry import build_model
from lmarch.models.transformer import Seq2SeqLoss, TransformerConfig

OBJECTIVES = ("clm", "mlm", "rtd", "span", "denoise", "seq2seq")
SEQ2SEQ_OBJECTIVES = ("span", "denoise", "seq2seq")
# the original Transformer's label smoothing (Vaswani et al. 2017, sec. 5.4); T5 and BART
# pre-train with plain cross-entropy
TRANSFORMER_LABEL_SMOOTHING = 0.1
RTD_WEIGHT = 50.0  # lambda of Clark et al. 2020, sec. 3.1

# BERT's 80% [MASK] / 10% random / 10% unchanged for MLM; ELECTRA's released code masks with
# [MASK] 85% of the time and leaves the other 15% of the chosen tokens as they are.
MLM_MASKING = MaskingConfig(probability=0.15, mask_fraction=0.8, random_fraction=0.1)
RTD_MASKING = MaskingConfig(probability=0.15, mask_fraction=0.85, random_fraction=0.0)


def masked_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, chosen: Tensor
) -> Tensor:
    """Vocabulary logits [N, V] at the ``chosen`` positions only. A model with an encoder
    ``bert`` and a head ``mlm`` (:class:`BertForMaskedLM`) applies the head to those N states
    alone, skipping ~85% of the V-wide output products; any other model is run whole."""
    if hasattr(model, "bert") and hasattr(model, "mlm"):
        return model.mlm(model.bert(input_ids, attention_mask)[chosen])
    return model(input_ids, attention_mask)[chosen]


def masked_lm_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """L_MLM of Devlin et al. 2019: cross-entropy at the positions whose label is not -100.

    ``batch`` is ``(masked_ids, attention_mask, labels, ...)``; ``model`` maps ids and mask to
    [B, T, V] logits.
    """
    input_ids, attention_mask, labels = batch[:3]
    chosen = labels != IGNORE_INDEX
    logits = masked_logits(model, input_ids, attention_mask, chosen)
    return F.cross_entropy(logits.float(), labels[chosen])


def sample_from_logits(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Draw one id per row of [N, V] ``logits`` by inverting the cumulative softmax at the
    given uniform numbers in [0, 1) (so the draw is reproducible from the batch alone)."""
    cdf = torch.cumsum(torch.softmax(logits.float(), dim=-1), dim=-1)
    ids = torch.searchsorted(cdf, uniforms[:, None].to(cdf.dtype).contiguous()).squeeze(-1)
    return ids.clamp(max=logits.shape[-1] - 1)


def generator_config(config: BertConfig, size: float = 0.25) -> BertConfig:
    """The ELECTRA generator for a discriminator ``config``: ``size`` times its hidden width,
    heads and feed-forward width (Clark et al. 2020, sec. 3.2 find 1/4 - 1/2 best), the same
    depth, and embeddings as wide as the discriminator's so the two can share them."""
    n_head = max(1, round(config.n_head * size))
    width = max(n_head, round(config.n_embd * size) // n_head * n_head)
    return dataclasses.replace(
        config,
        n_embd=width,
        n_head=n_head,
        intermediate_size=max(1, round(config.intermediate_size * size)),
        embedding_size=config.embedding_dim,
        variant="electra",
    )


class ElectraPretrainingModel(nn.Module):
    """Generator (a small masked LM) and discriminator trained together (Clark et al. 2020).

    ``forward(masked_ids, attention_mask, labels, uniforms)`` returns
    ``(mlm_loss, rtd_loss, replaced_fraction)``; :func:`replaced_token_detection_loss` combines
    them. ``discriminator.bert`` is the encoder to fine-tune afterwards.
    """

    def __init__(self, config: BertConfig, generator_size: float = 0.25) -> None:
        super().__init__()
        self.config = config
        self.generator = BertForMaskedLM(generator_config(config, generator_size))
        self.discriminator = ElectraForPreTraining(config)
        disc, gen = self.discriminator.bert, self.generator.bert
        gen.tok_emb = disc.tok_emb
        gen.pos_emb = disc.pos_emb
        gen.type_emb = disc.type_emb
        self.generator.mlm.decoder.weight = disc.tok_emb.weight

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, uniforms: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(L_MLM of the generator, L_Disc of the discriminator, share of tokens replaced)."""
        chosen = labels != IGNORE_INDEX
        gen_logits = masked_logits(self.generator, input_ids, attention_mask, chosen)
        mlm = F.cross_entropy(gen_logits.float(), labels[chosen])
        with torch.no_grad():
            sampled = sample_from_logits(gen_logits.detach(), uniforms[chosen])
        corrupt = input_ids.clone()
        corrupt[chosen] = sampled
        # positions not chosen keep their (unmasked) original, which labels do not carry
        original = torch.where(chosen, labels, input_ids)
        replaced = (corrupt != original).float()
        disc_logits = self.discriminator(corrupt, attention_mask)
        real = attention_mask.bool()
        rtd = F.binary_cross_entropy_with_logits(disc_logits[real].float(), replaced[real])
        return mlm, rtd, replaced[real].mean()


def replaced_token_detection_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """ELECTRA's L_MLM(G) + 50 L_Disc(D) (Clark et al. 2020, eq. 1 of sec. 2) for a batch
    ``(masked_ids, attention_mask, labels, uniforms)``."""
    mlm, rtd, _ = model(*batch[:4])
    return mlm + RTD_WEIGHT * rtd


def seq2seq_loss(config: object) -> Seq2SeqLoss:
    """The loss of an encoder-decoder run: label smoothing 0.1 for the original Transformer
    (:class:`TransformerConfig`), plain cross-entropy for T5 and BART / Marian."""
    smoothing = TRANSFORMER_LABEL_SMOOTHING if type(config) is TransformerConfig else 0.0
    return Seq2SeqLoss(smoothing)


def objective_model(objective: str, config: object) -> nn.Module:
    """The module a pre-training run trains: a masked LM, generator + discriminator, or for
    the sequence-to-sequence objectives the encoder-decoder itself."""
    if objective in SEQ2SEQ_OBJECTIVES:
        return build_model(config)
    if objective == "mlm":
        return build_bert_task_model(config, "masked_lm")
    if objective == "rtd":
        return ElectraPretrainingModel(config)
    raise ValueError(f"no encoder model for objective {objective!r}")


def objective_loss(
    objective: str, config: object = None
) -> Callable[[nn.Module, tuple[Tensor, ...]], Tensor]:
    """The Trainer loss function of an encoder or encoder-decoder objective (the latter needs
    the model ``config``: :func:`seq2seq_loss`)."""
    if objective in SEQ2SEQ_OBJECTIVES:
        return seq2seq_loss(config)
    return {"mlm": masked_lm_loss, "rtd": replaced_token_detection_loss}[objective]


def masking_for(objective: str, whole_word: bool = False) -> MaskingConfig:
    """The masking recipe of ``objective`` (``mlm`` or ``rtd``)."""
    base = RTD_MASKING if objective == "rtd" else MLM_MASKING
    return dataclasses.replace(base, whole_word=whole_word)


def pretrained_encoder(model: nn.Module) -> nn.Module:
    """The encoder worth fine-tuning inside a pre-training model: the masked LM's ``bert``,
    or ELECTRA's discriminator's."""
    if isinstance(model, ElectraPretrainingModel):
        return encoder_of(model.discriminator)
    return encoder_of(model)


__all__ = [
    "OBJECTIVES",
    "RTD_WEIGHT",
    "SEQ2SEQ_OBJECTIVES",
    "TRANSFORMER_LABEL_SMOOTHING",
    "ElectraPretrainingModel",
    "generator_config",
    "masked_lm_loss",
    "masked_logits",
    "masking_for",
    "objective_loss",
    "objective_model",
    "pretrained_encoder",
    "replaced_token_detection_loss",
    "sample_from_logits",
    "seq2seq_loss",
]
