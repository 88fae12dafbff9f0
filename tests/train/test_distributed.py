"""Distributed training on 2 CPU processes (gloo) against one process.

One launch of 2 ranks (tests/train/dist_worker.py, started as torchrun would start it) trains the
tiny GPT of tests/train/dist_setup.py under DDP and FSDP2; this process trains the same model on
the same global batches alone and compares:

- DDP, 2 ranks x B/2 rows, equals 1 process x B after 5 steps (weights <= 1e-5), with gradient
  accumulation too (DDP's no_sync on all but the last micro-batch);
- FSDP2 has the same loss trajectory as DDP (<= 1e-5 per step) and holds ~1/2 of the parameter,
  gradient and optimizer bytes per rank (the two ranks' local shards add up to the whole);
- FSDP2's bf16 mixed-precision policy keeps fp32 master shards and trains close to fp32;
- a sharded checkpoint written by 1 rank resumes on 2, and one written by 2 resumes on 1, both
  ending where 8 uninterrupted single-process steps end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmarch.errors import LmarchError
from lmarch.models.gpt import GPT, GPTConfig
from lmarch.models.registry import build_model, get_preset, replace_config
from lmarch.train.distributed import free_port, teardown
from lmarch.train.optim import build_optimizer
from lmarch.train.parallelize import (
    check_tensor_parallel,
    shard_bytes,
    unsharded_training_bytes,
)
from lmarch.train.sharded_checkpoint import (
    check_compatible,
    find_sharded_checkpoint,
    load_sharded,
)
from lmarch.train.trainer import Trainer
from lmarch.weights.safetensors_io import load_tensors

sys.path.insert(0, str(Path(__file__).parent))
from dist_setup import make_model, make_samplers, train_config  # noqa: E402

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def launch(spec: dict, root: Path, nproc: int = 2, timeout: float = 240) -> list[dict]:
    """Start ``nproc`` ranks of the worker with torchrun's variables; every rank must exit 0
    within ``timeout`` seconds (so a hang fails the test instead of stalling the suite)."""
    procs = start(spec, root, nproc)
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    return [json.loads((root / f"report{r}.json").read_text()) for r in range(nproc)]


def start(spec: dict, root: Path, nproc: int) -> list[subprocess.Popen]:
    """The worker's ranks, started (not waited for)."""
    root.mkdir(parents=True, exist_ok=True)
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps({"root": str(root), **spec}))
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PYTHONPATH": str(ROOT),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(spec_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def reference_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Single-process training on the same reference ``nn`` blocks the distributed strategies
    train (the native fused blocks round differently: ~3e-5 apart after 5 AdamW steps)."""
    import lmarch.train.trainer

    monkeypatch.setattr(lmarch.train.trainer, "accelerate", lambda model, training: model)


def single_run(out: Path, steps: list[int], **config) -> dict[int, dict[str, torch.Tensor]]:
    """Train one process (strategy single) and snapshot the weights after each of ``steps``."""
    trainer = Trainer(
        make_model(), *make_samplers(), train_config(**config), out_dir=out, callbacks=[]
    )
    snaps = {}
    for step in steps:
        trainer.fit(until=step)
        snaps[step] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return snaps


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


def sharded_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """A sharded checkpoint loaded into a plain model in this process (no process group)."""
    model = make_model()
    load_sharded(run_dir / "checkpoint", model, build_optimizer(model, train_config()))
    return model.state_dict()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], dict]:
    """2 ranks train 5 steps under DDP and under FSDP (one launch); one process trains the same
    model 8 steps alone (weights kept at 5 and 8)."""
    root = tmp_path_factory.mktemp("dist")
    runs = [
        {"name": "ddp", "config": {"strategy": "ddp"}, "until": 5},
        {"name": "fsdp", "config": {"strategy": "fsdp"}, "until": 5, "measure": True},
        {"name": "tp", "config": {"strategy": "tp"}, "until": 5},
        {"name": "tp", "config": {"strategy": "tp"}, "resume": True},
    ]
    reports = launch({"runs": runs, "tensor_parallel": True}, root)
    with pytest.MonkeyPatch.context() as mp:
        reference_blocks(mp)
        # max_iters 10 on the same schedule (decay over 8): identical to 8, then 2 more steps
        reference = single_run(root / "single", [5, 8, 10], max_iters=10)
    return root, reports, reference


@pytest.fixture(scope="module")
def launched_more(launched) -> tuple[Path, dict]:
    """A second launch: accumulation under DDP and FSDP, FSDP's bf16 policy, and the resume on
    2 ranks of a sharded checkpoint one rank wrote (a group of one in this process)."""
    root = launched[0] / "more"
    one = Trainer(
        make_model(), *make_samplers(), train_config(strategy="fsdp"), out_dir=root / "one_rank"
    )
    one.fit(until=5)
    teardown()
    accum = {"gradient_accumulation_steps": 2}
    runs = [
        {"name": "ddp_accum", "config": {"strategy": "ddp", **accum}, "until": 3},
        {"name": "fsdp_accum", "config": {"strategy": "fsdp", **accum}, "until": 3},
        {"name": "fsdp_bf16", "config": {"strategy": "fsdp", "precision": "bf16"}, "until": 5},
        {"name": "one_rank", "config": {"strategy": "fsdp"}, "resume": True},
    ]
    launch({"runs": runs}, root)
    with pytest.MonkeyPatch.context() as mp:
        reference_blocks(mp)
        reference = single_run(root / "single_accum", [3], **accum)
    return root, reference


def test_ddp_two_ranks_equal_one_process(launched) -> None:
    root, _, ref = launched
    ddp = load_tensors(root / "ddp" / "checkpoint" / "model.safetensors")
    assert max_diff(ddp, {k: ref[5][k] for k in ddp}) <= 1e-5
    single = losses(root / "single")
    assert max(abs(losses(root / "ddp")[i] - single[i]) for i in range(1, 6)) <= 1e-5


def test_fsdp_matches_ddp_and_one_process(launched) -> None:
    root, _, ref = launched
    fsdp, ddp = losses(root / "fsdp"), losses(root / "ddp")
    assert sorted(fsdp) == [1, 2, 3, 4, 5]
    assert max(abs(fsdp[i] - ddp[i]) for i in range(1, 6)) <= 1e-5
    assert max_diff(sharded_weights(root / "fsdp"), ref[5]) <= 1e-5


def test_fsdp_holds_half_the_training_bytes_per_rank(launched) -> None:
    _, reports, _ = launched
    full = unsharded_training_bytes(make_model())
    ranks = [r["fsdp"] for r in reports]
    per_rank = [r["params"] + r["grads"] + r["optim"] for r in ranks]
    # the shards partition every tensor: together they are the whole model's bytes
    assert sum(r["params"] for r in ranks) == full // 4
    assert sum(per_rank) == full
    assert all(0.4 * full <= b <= 0.6 * full for b in per_rank), (per_rank, full)
    assert ranks[0]["param_dtypes"] == ["torch.float32"]


def test_sharded_checkpoint_of_2_ranks_resumes_on_1(launched, monkeypatch, tmp_path) -> None:
    root, _, ref = launched
    reference_blocks(monkeypatch)
    # the 2-rank FSDP checkpoint at step 5, resumed here by one plain process up to step 8
    shutil.copytree(root / "fsdp", tmp_path / "run")
    trainer = Trainer(
        make_model(), *make_samplers(), train_config(), out_dir=tmp_path / "run", callbacks=[]
    )
    trainer.fit(resume=True)
    assert trainer.step == 8
    assert max_diff(trainer.model.state_dict(), ref[8]) <= 1e-5


@pytest.mark.slow
def test_accumulation_syncs_once_per_step(launched_more) -> None:
    root, ref = launched_more
    ddp = load_tensors(root / "ddp_accum" / "checkpoint" / "model.safetensors")
    assert max_diff(ddp, {k: ref[3][k] for k in ddp}) <= 1e-5
    assert max_diff(sharded_weights(root / "fsdp_accum"), ref[3]) <= 1e-5


@pytest.mark.slow
def test_fsdp_bf16_policy_keeps_fp32_shards(launched, launched_more) -> None:
    root = launched_more[0]
    bf16, fp32 = losses(root / "fsdp_bf16"), losses(launched[0] / "fsdp")
    diffs = [abs(bf16[i] - fp32[i]) for i in range(1, 6)]
    assert max(diffs) < 0.05 and max(diffs) > 0  # bf16 compute: close, not identical
    assert all(t.dtype == torch.float32 for t in sharded_weights(root / "fsdp_bf16").values())


@pytest.mark.slow
def test_sharded_checkpoint_of_1_rank_resumes_on_2(launched, launched_more) -> None:
    # the one-rank checkpoint at step 5 was resumed by 2 ranks up to step 8
    assert max_diff(sharded_weights(launched_more[0] / "one_rank"), launched[2][8]) <= 1e-5


@pytest.mark.slow
def test_rank_killed_mid_run_leaves_a_complete_checkpoint_to_resume(tmp_path, monkeypatch) -> None:
    long = {"max_iters": 40, "lr_decay_iters": 40}
    run = {"name": "fault", "config": {"strategy": "fsdp", "checkpoint_interval": 2, **long}}
    procs = start({"runs": [run]}, tmp_path, 2)
    meta = tmp_path / "fault" / "checkpoint" / "trainer.json"
    try:
        deadline = time.monotonic() + 240
        while not (meta.is_file() and json.loads(meta.read_text())["step"] >= 4):
            assert time.monotonic() < deadline and procs[1].poll() is None, "no checkpoint"
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGKILL)  # rank 1 dies mid-run
        procs[0].wait(timeout=120)  # rank 0 fails in its next collective instead of hanging
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0
    saved = find_sharded_checkpoint(tmp_path / "fault")
    assert saved is not None
    step = json.loads((saved / "trainer.json").read_text())["step"]
    assert 4 <= step < 40
    # one process resumes the last complete checkpoint and ends where an unbroken run ends
    reference_blocks(monkeypatch)
    reference = single_run(tmp_path / "single", [40], **long)[40]
    trainer = Trainer(
        make_model(), *make_samplers(), train_config(**long), out_dir=tmp_path / "fault"
    )
    trainer.fit(resume=True)
    assert trainer.step == 40
    assert max_diff(trainer.model.state_dict(), reference) <= 1e-5


def test_tensor_parallel_gpt_and_llama_equal_the_whole_model(launched) -> None:
    _, reports, _ = launched
    for rank in reports:
        for name in ("gpt", "llama"):
            tp = rank["tp"][name]
            assert tp["logits"] <= 1e-5, (name, tp)
            assert tp["grad_norm"] <= 1e-5, (name, tp)
            assert tp["step"] <= 1e-5, (name, tp)
            assert tp["greedy_equal"], name
            assert tp["sequence_parallel"], name


def test_tensor_parallel_training_equals_one_process(launched) -> None:
    root, _, ref = launched
    # 5 steps on 2 ranks, a checkpoint in the single-process layout, resumed on 2 ranks to 8
    tp, single = losses(root / "tp"), losses(root / "single")
    assert sorted(tp) == list(range(1, 9))
    assert max(abs(tp[i] - single[i]) for i in range(1, 9)) <= 1e-5
    weights = load_tensors(root / "tp" / "checkpoint" / "model.safetensors")
    assert max_diff(weights, {k: ref[8][k] for k in weights}) <= 1e-5


def test_tensor_parallel_checkpoint_resumes_on_one_process(launched, monkeypatch, tmp_path):
    root, _, ref = launched
    reference_blocks(monkeypatch)
    shutil.copytree(root / "tp", tmp_path / "run")
    trainer = Trainer(
        make_model(), *make_samplers(), train_config(max_iters=10), out_dir=tmp_path / "run"
    )
    trainer.fit(resume=True)  # weights and AdamW moments in the single-process order
    assert trainer.step == 10
    assert max_diff(trainer.model.state_dict(), ref[10]) <= 1e-5


def test_tensor_parallel_refuses_heads_not_divisible_by_ranks() -> None:
    config = GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=3, n_embd=48)
    with pytest.raises(LmarchError, match=r"tp on 2 ranks needs the attention heads \(3 query"):
        check_tensor_parallel(GPT(config), 2)
    llama = build_model(replace_config(get_preset("llama-tiny").config, n_layer=1))
    with pytest.raises(LmarchError, match=r"\(4 query, 2 key/value\) divisible by 4"):
        check_tensor_parallel(llama, 4)


def test_sharded_checkpoint_from_another_model_is_refused(launched) -> None:
    root, _, _ = launched
    config = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=48, bias=False)
    pattern = r"from another model: \S+ is \[65, 32\] there, \[65, 48\] here"
    with pytest.raises(LmarchError, match=pattern):
        check_compatible(root / "fsdp" / "checkpoint", GPT(config))


def test_several_ranks_of_a_single_process_run_are_refused(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LmarchError, match="2 ranks were started for strategy 'single'"):
        Trainer(make_model(), *make_samplers(), train_config())


def test_batch_not_divisible_by_ranks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # refused from torchrun's variables alone, before any rank waits for another
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(LmarchError, match="batch_size 4 is not divisible by the 3 ranks"):
        Trainer(make_model(), *make_samplers(), train_config(strategy="ddp"))


def test_shard_bytes_of_one_process_is_the_whole(tmp_path: Path) -> None:
    model = make_model()
    assert shard_bytes(model).params * 4 == unsharded_training_bytes(model)
