"""What :func:`lmarch.load` returns: a model with its tokenizer and the conventions that come
with it, each in a typed field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from lmarch.errors import LmarchError
from lmarch.models.heads import (
    CAUSAL_LM,
    CLASSIFIER,
    EMBEDDING,
    MASKED_LM,
    QUESTION_ANSWERING,
    REPLACED_TOKEN_DETECTION,
    TOKEN_CLASSIFIER,
)
from lmarch.tokenizers.base import Tokenizer

if TYPE_CHECKING:
    from lmarch.data.images import ImagePreprocessor

# image-text objectives, as their run folders name them (lmarch.loading.vision reads them)
CONTRASTIVE = "contrastive"  # CLIP: lmarch clip train, or a Hugging Face CLIP folder
CAPTION = "caption"  # a BLIP-style captioner: lmarch caption train
FLAMINGO = "flamingo"  # a frozen GPT with Flamingo layers: lmarch flamingo train

_DESCRIBED = {
    CAUSAL_LM: "a causal LM",
    MASKED_LM: "a masked-LM",
    REPLACED_TOKEN_DETECTION: "a replaced-token detector",
    CLASSIFIER: "a text classifier",
    TOKEN_CLASSIFIER: "a token classifier",
    QUESTION_ANSWERING: "a question-answering model",
    EMBEDDING: "a sentence encoder",
    CONTRASTIVE: "a CLIP model",
    CAPTION: "a captioner",
    FLAMINGO: "a Flamingo model",
}
# the command that uses a model of this objective, named in the refusal of any other
_TRY = {
    CONTRASTIVE: "lmarch clip zero-shot {name} --image FILE",
    CAPTION: "lmarch caption run {name} --image FILE",
    FLAMINGO: "lmarch flamingo ask {name} --image FILE --question TEXT",
}
# what a command can ask for: the objective (or family) that satisfies it, and in words
_NEEDS: dict[str, tuple[str, str, str]] = {
    "causal-lm": ("objective", CAUSAL_LM, "a causal LM"),
    "encoder": ("family", "bert", "a BERT-family encoder"),
    "classifier": ("objective", CLASSIFIER, "a classifier run (lmarch classify train)"),
    "clip": ("objective", CONTRASTIVE, "a CLIP model (lmarch clip train, or an HF CLIP folder)"),
    "captioner": ("objective", CAPTION, "a captioner (lmarch caption train)"),
    "flamingo": ("objective", FLAMINGO, "a Flamingo run (lmarch flamingo train)"),
}


@dataclass(frozen=True)
class ChatConvention:
    """How a model expects its text: the Jinja chat template (None: not a chat model), the
    token ids that end a turn or the text, the BOS id and whether raw prompts start with it."""

    template: str | None = None
    stop_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    add_bos: bool = False


@dataclass(frozen=True)
class Pooling:
    """How an encoder's token states become one vector (Sentence-BERT, Reimers & Gurevych
    2019): ``mode`` is ``"mean"``, ``"cls"`` or ``"max"``, ``normalize`` asks for unit
    vectors, ``max_length`` (when set) is the longest input the model was meant for."""

    mode: str = "cls"
    normalize: bool = False
    max_length: int | None = None


@dataclass
class LoadedModel:
    """A ready-to-use model, as :func:`lmarch.load` returns it.

    ``family`` is the registry family (``"llama"``, ``"gpt"``, ``"bert"``, ...); ``objective``
    one of :data:`lmarch.models.heads.OBJECTIVES`; ``pooling`` is set for encoders, ``labels`` for classifiers;
    ``quant`` is the quantisation actually used (``"none"``, ``"q4"``, ...), ``load_s`` the
    seconds loading took. ``compile_decode`` is set by
    :func:`lmarch.tasks.generate.prepare_for_decoding`. Image-text models (objectives
    ``contrastive``, ``caption``, ``flamingo``) carry the ``preprocessor`` that turns images
    into their pixels.
    """

    model: nn.Module
    tokenizer: Tokenizer
    name: str
    family: str
    objective: str
    chat: ChatConvention = field(default_factory=ChatConvention)
    pooling: Pooling | None = None
    labels: tuple[str, ...] | None = None
    quant: str = "none"
    load_s: float = 0.0
    compile_decode: bool = False
    preprocessor: ImagePreprocessor | None = None

    @property
    def chat_template(self) -> str | None:
        """The chat template, or None for a model that is not a chat model."""
        return self.chat.template

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Token ids that end the text or the turn."""
        return self.chat.stop_token_ids

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-text id, if the vocabulary has one."""
        return self.chat.bos_token_id

    @property
    def add_bos(self) -> bool:
        """Whether raw prompts start with the BOS token."""
        return self.chat.add_bos

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a raw prompt, with BOS in front when the model expects one."""
        ids = self.tokenizer.encode(text)
        if self.chat.add_bos and self.chat.bos_token_id is not None:
            ids = [self.chat.bos_token_id, *ids]
        return ids

    def describe(self) -> str:
        """``"a masked-LM (bert)"``: what this model is, in the words of an error message."""
        return f"{_DESCRIBED.get(self.objective, self.objective)} ({self.family})"

    def require(self, need: str, command: str) -> LoadedModel:
        """Return ``self`` if ``command`` can use this model, else raise one line saying why.

        ``need`` is ``"causal-lm"`` (generate, chat, sample, eval), ``"encoder"`` (embed,
        search, classify train: any BERT-family model), ``"classifier"`` (classify predict),
        ``"clip"``, ``"captioner"`` or ``"flamingo"`` (the image-text commands). An image-text
        model refused elsewhere names the command that takes it.
        """
        if need not in _NEEDS:
            raise ValueError(f"unknown need {need!r}; one of {sorted(_NEEDS)}")
        field_name, wanted, words = _NEEDS[need]
        if getattr(self, field_name) != wanted:
            hint = _TRY[self.objective].format(name=self.name) if self.objective in _TRY else None
            raise LmarchError(
                f"{self.name} holds {self.describe()}; {command} needs {words}",
                hint=None if hint is None else f"try {hint}",
            )
        return self


__all__ = [
    "CAPTION",
    "CONTRASTIVE",
    "FLAMINGO",
    "ChatConvention",
    "LoadedModel",
    "Pooling",
]
