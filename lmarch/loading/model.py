"""What :func:`lmarch.load` returns: a model with its tokenizer and the conventions that come
with it, each in a typed field."""

from __future__ import annotations

from dataclasses import dataclass, field

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

_DESCRIBED = {
    CAUSAL_LM: "a causal LM",
    MASKED_LM: "a masked-LM",
    REPLACED_TOKEN_DETECTION: "a replaced-token detector",
    CLASSIFIER: "a text classifier",
    TOKEN_CLASSIFIER: "a token classifier",
    QUESTION_ANSWERING: "a question-answering model",
    EMBEDDING: "a sentence encoder",
}
# what a command can ask for: the objectives (or the family) that satisfy it, and its words
_NEEDS: dict[str, tuple[str, str]] = {
    "causal-lm": ("objective", "a causal LM"),
    "encoder": ("family", "a BERT-family encoder"),
    "classifier": ("objective", "a classifier run (lmarch classify train)"),
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
    :func:`lmarch.tasks.generate.prepare_for_decoding`.
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
        search, classify train: any BERT-family model) or ``"classifier"`` (classify predict).
        """
        if need not in _NEEDS:
            raise ValueError(f"unknown need {need!r}; one of {sorted(_NEEDS)}")
        kind, words = _NEEDS[need]
        ok = self.family == "bert" if kind == "family" else self.objective == need
        if not ok:
            raise LmarchError(f"{self.name} holds {self.describe()}; {command} needs {words}")
        return self


__all__ = [
    "ChatConvention",
    "LoadedModel",
    "Pooling",
]
