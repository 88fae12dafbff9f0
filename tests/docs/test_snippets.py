"""Every command and snippet in README.md and docs/ runs, so the docs cannot rot.

Fast tier: each ``lmarch`` command line is parsed by the real parser (a renamed option fails
here), and the python blocks and bash blocks marked fast run in a temporary folder within a time
budget. Slow tier: every bash and python block runs, in order per file, exit status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from doc_blocks import (
    DEFAULT_ADDRESS,
    REPO,
    Block,
    all_blocks,
    blocks,
    doc_files,
    lmarch_commands,
    runs_fast,
)

from lmarch.cli.main import build_parser

FAST_BUDGET_S = 30  # per block; the whole fast tier stays well under a minute
SLOW_BUDGET_S = 3600
SERVER_START_S = 300  # loading the served models on a busy machine
VENV_BIN = Path(sys.executable).parent


def _lines() -> list:
    return [
        pytest.param(b.where, argv, id=f"{b.where}:{argv[0] if argv else ''}")
        for b in all_blocks()
        for argv in lmarch_commands(b)
    ]


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.mark.parametrize(("where", "argv"), _lines())
def test_lmarch_command_parses(parser: argparse.ArgumentParser, where: str, argv: list[str]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: 'lmarch {' '.join(argv)}' does not parse: {err.getvalue().strip()}")
        raise AssertionError from exc
    assert args.command == argv[0], f"{where}: parsed as {args.command!r}"


def test_commands_are_found():
    """The extraction itself: the README's commands are all seen, multi-line prompts joined."""
    readme = [argv for b in blocks(REPO / "README.md") for argv in lmarch_commands(b)]
    assert ["presets"] in readme
    prompt = next(a for a in readme if a[:2] == ["generate", "smollm2-135m"] and "\n" in a[2])
    assert prompt[2] == "<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt[3:] == ["--max-new-tokens", "64", "--json"]
    chained = [a for a in readme if a[0] == "ngram"]
    assert [a[1] for a in chained] == ["train", "sample", "eval"]


def test_snippet_marks_are_read(tmp_path: Path):
    """A server mark carries the serve arguments and keeps the block out of the fast tier; a
    server block must name the default address (the tester swaps its port); unknown marks fail."""
    page = tmp_path / "page.md"
    server = "<!-- snippet: server smollm2-135m --embed minilm-l6 -->"
    code = 'print("http://127.0.0.1:8000/v1")'
    page.write_text(
        f"{server}\n```python\n{code}\n```\n\n<!-- snippet: slow -->\n```python\nx\n```\n"
    )
    first, second = blocks(page)
    assert (first.server, first.marks, runs_fast(first)) == (
        ["smollm2-135m", "--embed", "minilm-l6"],
        {"server", "slow"},
        False,
    )
    assert (second.server, second.marks, runs_fast(second)) == (None, {"slow"}, False)
    for bad, message in [
        (f"{server}\n```python\nprint(1)\n```\n", "must name 127.0.0.1:8000"),
        (f"<!-- snippet: server -->\n```python\n{code}\n```\n", "needs the arguments"),
        ("<!-- snippet: quick -->\n```bash\nls\n```\n", "unknown snippet mark(s) ['quick']"),
    ]:
        page.write_text(bad)
        with pytest.raises(ValueError, match=re.escape(message)):
            blocks(page)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env["MPLBACKEND"] = "Agg"
    # two cores shared by the whole suite: one thread avoids contention (10x on a busy machine)
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"  # nothing is fetched: a snippet that needs the hub fails at once
    return env


def run_block(block: Block, cwd: Path, budget_s: float, text: str | None = None) -> float:
    """Run one block in ``cwd`` (python in the venv's interpreter, bash with the venv's bin first
    on PATH); fail with its output on a non-zero exit or past the budget. ``text`` replaces the
    block's own (a server block pointed at its port). Returns seconds."""
    text = block.text if text is None else text
    if block.lang == "python":
        argv = [sys.executable, "-c", text]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", text]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            env=_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=budget_s,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where}: still running after {budget_s} s")
    took = time.perf_counter() - start
    if done.returncode != 0:
        pytest.fail(
            f"{block.where}: exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}"
            f"\n--- stderr\n{done.stderr[-3000:]}"
        )
    return took


def _fast_files() -> list[Path]:
    return [p for p in doc_files() if any(runs_fast(b) for b in blocks(p))]


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


@pytest.mark.parametrize("path", _fast_files(), ids=_rel)
def test_fast_blocks_run(path: Path, tmp_path: Path):
    for block in blocks(path):
        if runs_fast(block):
            run_block(block, tmp_path, FAST_BUDGET_S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(block: Block, cwd: Path) -> Iterator[int]:
    """``lmarch serve`` with the block's arguments on a free loopback port, up (``/health``
    answers) for the block's run and stopped after; fails with its output if it never comes up."""
    assert block.server is not None
    port = _free_port()
    log = cwd / f"serve-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "lmarch"), "serve", *block.server, "--port", str(port)],
            cwd=cwd,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{block.where}: lmarch serve did not come up:\n{log.read_text()}")
                time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("path", doc_files(), ids=_rel)
def test_all_blocks_run(path: Path, tmp_path: Path):
    for block in blocks(path):
        if block.lang not in {"bash", "python"}:
            continue
        if block.server is None:
            took = run_block(block, tmp_path, SLOW_BUDGET_S)
        else:
            with serving(block, tmp_path) as port:
                text = block.text.replace(DEFAULT_ADDRESS, f"127.0.0.1:{port}")
                took = run_block(block, tmp_path, SLOW_BUDGET_S, text)
        print(f"{block.where}: {took:.0f} s")  # shown with -s: where a page's time goes
