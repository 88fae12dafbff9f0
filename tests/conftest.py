"""Shared fixtures: small real text and tiny models, so tests stay fast on two cores."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from lmarch.data.corpus import TINY_SHAKESPEARE

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """The first 200,000 characters of tinyshakespeare (real text, small enough to be quick)."""
    return TINY_SHAKESPEARE.read_text(encoding="utf-8")[:200_000]


@pytest.fixture
def small_text_file(tmp_path: Path, shakespeare_text: str) -> Path:
    """A 60,000-character slice of Shakespeare written to a temporary .txt file."""
    path = tmp_path / "tiny.txt"
    path.write_text(shakespeare_text[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices on a shared two-core machine: one thread is much faster than two
    contending ones (measured 0.004 s against 0.35 s per MiniLM forward). For a whole module:
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Cli:
    """Runs ``lmarch ARGV`` in-process and returns what it printed."""

    def __init__(self, capsys: pytest.CaptureFixture) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        """(exit code, stdout, stderr); argparse's own errors exit from inside parse_args."""
        from lmarch.cli.main import main

        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def json(self, *argv: str) -> dict:
        """The JSON summary a successful ``--json`` run prints as its last line."""
        code, out, err = self(*argv, "--json")
        assert code == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def error(self, *argv: str) -> str:
        """The one line a refused command prints (asserting exit code 2 and no traceback)."""
        code, _, err = self(*argv)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, err
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture) -> Cli:
    """``cli("train", ...)``, ``cli.json(...)``, ``cli.error(...)``: the command in-process."""
    return Cli(capsys)


# gpt-char-tiny shrunk to 1 layer, 2 heads, 32 wide, block 32: trains 30 steps in ~2 s
TINY_GPT = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    """The run folder of ``lmarch train --preset gpt-char-tiny`` (shrunk, see TINY_GPT), 30
    iterations on 60,000 characters of Shakespeare; the ``--json`` summary is ``summary.json``.
    Shared by the whole session: copy it (``shutil.copytree``) before changing it."""
    import contextlib
    import io

    from lmarch.cli.main import main

    root = tmp_path_factory.mktemp("tiny_run")
    data = root / "tiny.txt"
    data.write_text(shakespeare_text[:60_000], encoding="utf-8")
    out, stdout = root / "run", io.StringIO()
    argv = [
        "train", "--preset", "gpt-char-tiny", "--data", str(data), "--out", str(out),
        "--max-iters", "30", *TINY_GPT, "--eval-interval", "15", "--eval-iters", "2", "--json",
    ]  # fmt: skip
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    (root / "summary.json").write_text(stdout.getvalue().strip().splitlines()[-1])
    return out


ASCII_BITS = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"-()"


def mixed_unicode_strings(
    n: int,
    seed: int,
    fixed: Sequence[str],
    ranges: Sequence[tuple[int, int]],
    *,
    max_parts: int,
    range_below: float,
    max_run: int,
    max_ascii: int,
) -> list[str]:
    """Seeded strings for fuzzing a tokenizer against its oracle: each is up to ``max_parts``
    parts, a part being one of ``fixed`` (probability 0.45), a run of 1..``max_run`` code points
    from one of ``ranges`` (up to ``range_below``), or 1..``max_ascii`` ASCII letters, digits
    and punctuation."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, max_parts)):
            roll = rng.random()
            if roll < 0.45:
                parts.append(rng.choice(fixed))
            elif roll < range_below:
                lo, hi = rng.choice(ranges)
                parts.append(
                    "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, max_run)))
                )
            else:
                parts.append(
                    "".join(rng.choice(ASCII_BITS) for _ in range(rng.randint(1, max_ascii)))
                )
        out.append("".join(parts))
    return out


@pytest.fixture(scope="session")
def unicode_strings():
    """:func:`mixed_unicode_strings`, for the tokenizer tests' fixtures."""
    return mixed_unicode_strings


@pytest.fixture
def tiny_decoders():
    """``tiny_decoders(vocab_size)``: a 2-layer GPT and a 2-layer LLaMA (grouped-query attention,
    4 query / 2 key-value heads), 32 wide with a 32-token context, seeded (torch seed 0)."""
    from lmarch.models import GPT, GPTConfig, Llama, LlamaConfig

    def make(vocab_size: int) -> list[torch.nn.Module]:
        torch.manual_seed(0)
        gpt = GPT(GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
        llama = Llama(
            LlamaConfig(
                vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                n_embd=32, intermediate_size=64,
            )
        )  # fmt: skip
        return [gpt, llama]

    return make


@pytest.fixture(scope="session")
def tiny_bart_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-initialised tiny BART folder as transformers writes it, with a byte-level BPE
    (lmarch's RoBERTa-layout trainer) saved as the older vocab.json + merges.txt pair."""
    from transformers import BartConfig, BartForConditionalGeneration

    from lmarch.data.shakespeare_tasks import PIG_LATIN_TASK, task_rows
    from lmarch.tokenizers.kinds import roberta_bpe

    folder, vocab_size, positions = tmp_path_factory.mktemp("bart") / "hf", 400, 64

    rows = task_rows(PIG_LATIN_TASK, "train")[:1500]
    tok = roberta_bpe("\n".join(r["source"] + "\n" + r["target"] for r in rows), vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({**tok.vocab, **tok.special_tokens}))
    merges = "".join(f"{a} {b}\n" for a, b in tok.merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=tok.vocab_size,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=positions,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        forced_bos_token_id=None,
    )
    BartForConditionalGeneration(config).save_pretrained(folder)
    return folder
