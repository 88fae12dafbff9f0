"""``lmarch train --strategy ddp|fsdp --nproc N`` through the CLI, and ``lmarch consolidate``.

One launch (``--nproc 2``: the command starts torchrun, which starts 2 gloo ranks) trains a tiny
GPT with FSDP; the run folder is then read by single-process commands in this process:
consolidated, sampled, evaluated and resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmarch.data.corpus import TINY_SHAKESPEARE
from lmarch.models.registry import build_model, config_from_dict
from lmarch.train.config import TrainConfig
from lmarch.train.optim import build_optimizer
from lmarch.train.sharded_checkpoint import load_sharded
from lmarch.weights.safetensors_io import load_tensors

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--preset", "gpt-char-tiny", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
    "--block-size", "32", "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "2",
    "--log-interval", "1", "--warmup-iters", "1",
]  # fmt: skip


def lmarch(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m lmarch ARGV`` in a fresh process (torchrun needs real processes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmarch", *[str(a) for a in argv]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,  # torchrun and its ranks too are stopped on a timeout
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    data = out.parent / "text.txt"
    data.write_text(TINY_SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    proc = lmarch(
        "train", *TINY, "--data", data, "--out", out, "--strategy", "fsdp", "--nproc", "2",
        "--batch-size", "4", "--json",
    )  # fmt: skip
    return out, proc


def test_nproc_trains_with_rank_0_alone_speaking(fsdp_run) -> None:
    out, proc = fsdp_run
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["iters"] == 4
    assert len(proc.stdout.strip().splitlines()) == 1  # one --json line: rank 1 printed nothing
    assert proc.stderr.count("done: 4 iterations") == 1
    assert "fsdp on 2 ranks: parameters + gradients + AdamW state" in proc.stderr
    assert "(50% of" in proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # written once, by rank 0
    assert (out / "checkpoint" / "COMPLETE").is_file()
    assert json.loads((out / "config.json").read_text())["train"]["strategy"] == "fsdp"


def test_consolidated_run_is_read_by_single_process_commands(fsdp_run, cli, tmp_path) -> None:
    out, proc = fsdp_run
    assert proc.returncode == 0, proc.stderr
    single = tmp_path / "single"
    assert "lmarch consolidate" in cli.error("sample", out, "--max-new-tokens", "4")
    done = cli.json("consolidate", out, "--out", single)
    assert done["iter"] == 4
    # the gathered weights are exactly the shards the ranks wrote
    model = build_model(config_from_dict(json.loads((out / "config.json").read_text())["model"]))
    load_sharded(out / "checkpoint", model, build_optimizer(model, TrainConfig()))
    gathered = load_tensors(single / "checkpoint" / "model.safetensors")
    for name, tensor in gathered.items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    code, text, err = cli("sample", single, "--max-new-tokens", "12", "--seed", "1")
    assert code == 0 and len(text.strip()) > 0, err
    assert cli.json("eval", single, "--data", out.parent / "text.txt")["loss"] > 0
    # and a single process resumes it where the ranks stopped
    resumed = cli.json("train", "--resume", "--out", single, "--max-iters", "6")
    assert resumed["iters"] == 6


def test_consolidate_refuses_a_run_without_a_sharded_checkpoint(cli, tmp_path) -> None:
    (tmp_path / "run").mkdir()
    line = cli.error("consolidate", tmp_path / "run", "--out", tmp_path / "out")
    assert "has no sharded checkpoint" in line


def test_strategy_refusals_are_one_line(cli, tmp_path, monkeypatch) -> None:
    line = cli.error("train", *TINY, "--out", tmp_path / "a", "--strategy", "zero")
    assert "strategy must be one of ['single', 'ddp', 'fsdp', 'tp']" in line
    # rank 0 of 3 (torchrun's variables): refused before it waits for the other ranks
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    line = cli.error("train", *TINY, "--out", tmp_path / "b", "--strategy", "tp")
    assert line == (
        "lmarch train: error: --strategy tp on 3 ranks needs the attention heads (2 query, 2 "
        "key/value) divisible by 3 (hint: run on a number of ranks that divides 2, or use ddp / "
        "fsdp)"
    )
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    line = cli.error("train", *TINY, "--out", tmp_path / "c", "--nproc", "0")
    assert line == "lmarch train: error: --nproc must be >= 1, got 0"


@pytest.mark.slow
def test_batch_not_divisible_by_ranks_exits_2_on_every_rank(tmp_path) -> None:
    proc = lmarch(
        "train", *TINY, "--out", tmp_path / "run", "--strategy", "ddp", "--nproc", "2",
        "--batch-size", "3",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "lmarch train: error: batch_size 3 is not divisible by the 2 ranks; each rank takes an "
        "equal slice of the global batch (global batch_size 3, 2 ranks) (hint: set batch_size to "
        "a multiple of 2)"
    ], proc.stderr


@pytest.mark.parametrize("strategy", ["fsdp", "tp"])
def test_sharding_strategies_refuse_adapter_methods(cli, tmp_path, strategy) -> None:
    line = cli.error(
        "finetune", "gpt-char-tiny", "--out", tmp_path / "ft", "--method", "lora",
        "--strategy", strategy,
    )  # fmt: skip
    assert line == (
        f"lmarch finetune: error: --strategy {strategy} fine-tunes all weights (--method full), "
        "not lora (hint: adapters are small: use --strategy ddp)"
    )


@pytest.mark.slow
def test_lora_finetune_on_2_ddp_ranks_equals_one_process(fsdp_run, cli, tmp_path) -> None:
    out, proc = fsdp_run
    assert proc.returncode == 0, proc.stderr
    base = tmp_path / "base"
    cli.json("consolidate", out, "--out", base)
    common = [
        "--data", out.parent / "text.txt", "--method", "lora", "--max-iters", "3",
        "--batch-size", "4", "--eval-iters", "2", "--dropout", "0",
    ]  # fmt: skip
    ranks = lmarch("finetune", base, *common, "--out", tmp_path / "ddp", "--strategy", "ddp",
                   "--nproc", "2", "--json")  # fmt: skip
    assert ranks.returncode == 0, ranks.stderr
    one = cli.json("finetune", base, *common, "--out", tmp_path / "one")
    two = json.loads(ranks.stdout.strip().splitlines()[-1])
    assert abs(one["val_loss_after"] - two["val_loss_after"]) <= 1e-5
    a = load_tensors(tmp_path / "one" / "adapter_model.safetensors")
    b = load_tensors(tmp_path / "ddp" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
