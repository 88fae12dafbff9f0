"""The chat loop (lmarch.tasks.chat.chat_loop) that `lmarch chat` runs, with a stand-in session."""

from __future__ import annotations

import io
from types import SimpleNamespace

from lmarch.tasks.chat import chat_loop


class _EchoSession:
    """Replies with the message upper-cased, in two pieces; records what it was asked."""

    def __init__(self) -> None:
        self.loaded = SimpleNamespace(name="echo")
        self.calls: list[tuple] = []

    def send(self, text: str):
        self.calls.append(("send", text))
        yield text[:1].upper()
        yield text[1:].upper()

    def reset(self) -> None:
        self.calls.append(("reset",))

    def set_system(self, text: str | None) -> None:
        self.calls.append(("system", text))


def test_commands_and_turns_in_order() -> None:
    """Blank lines are skipped, /reset and /system reach the session, /quit ends the loop (the
    line after it is never read); replies stream to the output, one line each."""
    session = _EchoSession()
    lines = io.StringIO("hello\n\n/reset\n/system  Be brief. \nbye\n/quit\nnever read\n")
    out = io.StringIO()
    chat_loop(session, lines, out)
    assert session.calls == [
        ("send", "hello"), ("reset",), ("system", "Be brief."), ("send", "bye"),
    ]  # fmt: skip
    assert out.getvalue() == (
        "HELLO\n(conversation cleared)\n(system message set; conversation cleared)\nBYE\n"
    )
    assert lines.readline() == "never read\n"


def test_interactive_shows_help_and_prompts_and_stops_at_end_of_input() -> None:
    session = _EchoSession()
    out = io.StringIO()
    chat_loop(session, io.StringIO("hi\n"), out, interactive=True)
    assert out.getvalue() == (
        "echo: /reset clears the chat, /system TEXT sets the system message, /quit\n> HI\n> "
    )
