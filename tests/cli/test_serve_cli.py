"""``lmarch serve``: it serves a run folder until interrupted, and refuses bad input in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch


@pytest.fixture(scope="module")
def tiny_chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer LLaMA with a character vocabulary, saved as a run folder."""
    from lmarch.loading import LoadedModel
    from lmarch.loading.saving import save_loaded
    from lmarch.models import Llama, LlamaConfig
    from lmarch.tokenizers.char import CharTokenizer

    torch.manual_seed(0)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz ,.!?\n"))
    config = LlamaConfig(
        vocab_size=len(chars), block_size=64, n_layer=1, n_head=2, n_embd=16,
        intermediate_size=32,
    )  # fmt: skip
    loaded = LoadedModel(Llama(config), CharTokenizer(chars), "tiny", "llama", "causal-lm")
    return save_loaded(loaded, tmp_path_factory.mktemp("serve_cli") / "run")


def test_serve_answers_until_interrupted(tiny_chat_run: Path) -> None:
    from lmarch.serve.server import free_port

    port = free_port()
    argv = [sys.executable, "-m", "lmarch", "serve", str(tiny_chat_run), "--port", str(port),
            "--max-batch", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMARCH_API_KEY": "k"}  # the key from the env
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                health = httpx.get(url + "/health", timeout=1).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.1)
        assert health["model"] == str(tiny_chat_run) and health["max_batch"] == 2
        body = {"model": str(tiny_chat_run), "prompt": "to be", "max_tokens": 5, "temperature": 0}
        out = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 5
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=20)
    err = proc.stderr.read()
    assert code == 0, err
    assert f"on http://127.0.0.1:{port} (playground at /" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], "nothing to serve"),
        (["RUN", "--port", "70000"], "--port must lie in 1..65535, got 70000"),
        (["RUN", "--max-batch", "0"], "max_batch must be a whole number >= 1, got 0"),
        (["RUN", "--context", "1"], "context must be a whole number >= 2, got 1"),
        (["RUN", "--api-key", " "], "the API key is empty"),
        (["RUN", "--host", "no such host"], "is not an address or a host name"),
        (["minilm-l6"], "serve needs a causal LM"),
        (["RUN", "--embed", "RUN"], "needs a BERT-family encoder"),
        (["/no/such/model"], "no model at '/no/such/model'"),
        (["RUN", "--port", "eight"], "invalid int value: 'eight'"),
    ],
)
def test_bad_input_is_one_line(cli, tiny_chat_run: Path, argv: list[str], words: str) -> None:
    argv = [str(tiny_chat_run) if a == "RUN" else a for a in argv]
    assert words in cli.error("serve", *argv)
