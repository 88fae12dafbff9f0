"""Chatting with an instruction-tuned model: a conversation rendered through the model's own
chat template, replies streamed, history trimmed to fit the context window."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TextIO

from lmarch.errors import LmarchError
from lmarch.generation import GenerationStats, SamplingConfig, stream_text
from lmarch.loading import LoadedModel
from lmarch.tokenizers.chat import render_chat


class ChatSession:
    """A conversation with ``loaded``: ``send`` streams the reply and keeps the history.

    Oldest turns are dropped (the system message is kept) when the rendered conversation plus
    ``max_new_tokens`` would not fit the model's context window.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        sampling: SamplingConfig,
        max_new_tokens: int = 256,
        system: str | None = None,
        seed: int | None = None,
    ) -> None:
        if loaded.chat_template is None:
            raise LmarchError(f"{loaded.name} has no chat template", hint="use 'lmarch generate'")
        self.loaded = loaded
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.seed = seed
        self.turns: list[dict[str, str]] = []
        self.last_stats = GenerationStats()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.turns = []

    def set_system(self, text: str | None) -> None:
        """Replace the system message and start over."""
        self.system = text or None
        self.reset()

    def messages(self, turns: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        """The conversation as chat-template messages."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.turns if turns is None else turns)

    def prompt_ids(self) -> list[int]:
        """The rendered conversation's token ids, trimmed from the oldest turn to fit."""
        window = self.loaded.model.max_positions
        turns = list(self.turns)
        while True:
            text = render_chat(self.loaded.chat_template, self.messages(turns), True)
            ids = self.loaded.encode_prompt(text)
            if len(ids) + self.max_new_tokens <= window or len(turns) <= 1:
                break
            turns = turns[2:] if len(turns) > 2 else turns[1:]
        if len(ids) + 1 > window:
            raise LmarchError(f"the message is too long for the {window}-token context window")
        self.turns = turns
        return ids

    def send(self, user_text: str) -> Iterator[str]:
        """Add a user message and stream the assistant's reply (added to the history at the end)."""
        self.turns.append({"role": "user", "content": user_text})
        ids = self.prompt_ids()
        budget = min(self.max_new_tokens, self.loaded.model.max_positions - len(ids))
        self.last_stats = GenerationStats()
        reply = []
        for piece in stream_text(
            self.loaded.model,
            self.loaded.tokenizer,
            ids,
            budget,
            self.sampling,
            seed=self.seed,
            stop_token_ids=self.loaded.stop_token_ids,
            stats=self.last_stats,
            compile=self.loaded.compile_decode,
        ):
            reply.append(piece)
            yield piece
        self.turns.append({"role": "assistant", "content": "".join(reply)})


COMMANDS_HELP = "/reset clears the chat, /system TEXT sets the system message, /quit"


def chat_loop(session: ChatSession, lines: TextIO, out: TextIO, interactive: bool = False) -> None:
    """Read user messages from ``lines`` (one a line) and stream the replies to ``out``.

    ``/reset`` forgets the conversation, ``/system TEXT`` sets the system message (and starts
    over), ``/quit`` or ``/exit`` or the end of input stops; blank lines are skipped. With
    ``interactive`` a ``> `` prompt is shown before each message.
    """
    if interactive:
        out.write(f"{session.loaded.name}: {COMMANDS_HELP}\n")
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = lines.readline()
        if not line:
            break
        text = line.rstrip("\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
            continue
        if text.startswith("/system"):
            session.set_system(text[len("/system") :].strip())
            out.write("(system message set; conversation cleared)\n")
            continue
        for piece in session.send(text):
            out.write(piece)
            out.flush()
        out.write("\n")
