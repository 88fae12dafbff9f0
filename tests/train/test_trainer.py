"""The Trainer: learning on real text, bit-identical resume, non-finite loss, schedule, decay."""

from __future__ import annotations

import math

import pytest
import torch

from lmarch.data.batches import RandomBlockSampler
from lmarch.models import GPT, GPTConfig
from lmarch.native import native_available
from lmarch.tokenizers import CharTokenizer
from lmarch.train.config import TrainConfig
from lmarch.train.optim import learning_rate_at, parameter_groups
from lmarch.train.trainer import NonFiniteLossError, Trainer, causal_lm_loss
from lmarch.weights.checkpoint import find_checkpoint


def make_trainer(text: str, out_dir, seed: int = 0, dropout: float = 0.0, **overrides) -> Trainer:
    tok = CharTokenizer.from_text(text)
    ids = torch.tensor(tok.encode(text))
    n = int(0.9 * len(ids))
    cfg = TrainConfig(
        **{
            "batch_size": 8,
            "max_iters": 20,
            "learning_rate": 3e-3,
            "warmup_iters": 5,
            "eval_interval": 10,
            "eval_iters": 4,
            "log_interval": 5,
            "seed": seed,
            **overrides,
        }
    )
    torch.manual_seed(cfg.seed)
    model = GPT(
        GPTConfig(
            vocab_size=tok.vocab_size,
            block_size=32,
            n_layer=2,
            n_head=2,
            n_embd=32,
            dropout=dropout,
        )
    )
    return Trainer(
        model,
        RandomBlockSampler(ids[:n], 32, cfg.batch_size, seed),
        RandomBlockSampler(ids[n:], 32, cfg.batch_size, seed + 1),
        cfg,
        out_dir=out_dir,
    )


def test_loss_drops_on_real_text(shakespeare_text, tmp_path) -> None:
    """A tiny GPT trained 200 steps on Shakespeare goes from ln(V) ~ 4.1 to below 2.6 nats."""
    trainer = make_trainer(
        shakespeare_text, tmp_path, max_iters=200, eval_interval=200, batch_size=32
    )
    before = trainer.evaluate()["val_loss"]
    result = trainer.fit()
    assert before > 3.9
    assert result.val_loss < 2.6
    assert before - result.val_loss > 1.3


def test_bf16_autocast_trains(shakespeare_text, tmp_path) -> None:
    """Under bf16 autocast the same run still learns (loss drops by > 0.9 nats in 80 steps)."""
    trainer = make_trainer(
        shakespeare_text, tmp_path, max_iters=80, eval_interval=80, dtype="bfloat16"
    )
    before = trainer.evaluate()["val_loss"]
    assert before - trainer.fit().val_loss > 0.9


def test_resume_is_bit_identical(shakespeare_text, tmp_path) -> None:
    """20 steps straight == 10 steps, a fresh process-like restart with --resume, 10 more."""
    straight = make_trainer(shakespeare_text, tmp_path / "a")
    straight.fit()

    first = make_trainer(shakespeare_text, tmp_path / "b")
    first.fit(until=10)
    assert first.step == 10
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it
    second = make_trainer(shakespeare_text, tmp_path / "b", seed=0)
    second.fit(resume=True)
    assert second.step == 20
    a, b = straight.model.state_dict(), second.model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sa, sb = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    for pid in sa:
        assert torch.equal(sa[pid]["exp_avg_sq"], sb[pid]["exp_avg_sq"])


def test_resume_with_dropout_is_bit_identical(shakespeare_text, tmp_path) -> None:
    """With dropout the global RNG matters too; it is restored from the checkpoint."""
    runs = []
    for name, until in (("a", None), ("b", 7)):
        t = make_trainer(shakespeare_text, tmp_path / name, max_iters=14, eval_interval=7)
        for m in t.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.3
        t.fit(until=until)
        runs.append(t)
    resumed = make_trainer(shakespeare_text, tmp_path / "b", max_iters=14, eval_interval=7)
    for m in resumed.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    torch.manual_seed(999)
    resumed.fit(resume=True)
    for name, tensor in runs[0].model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_resume_with_dropout_in_the_fused_block_is_bit_identical(
    shakespeare_text, tmp_path, monkeypatch
) -> None:
    """The fused GPT-2 block draws its dropout masks from a seed taken from the global RNG:
    restored from the checkpoint, 14 steps straight == 7 + resume + 7."""
    from lmarch.native import gpt_block as block_module

    calls = []
    real = block_module.gpt_block
    monkeypatch.setattr(
        block_module, "gpt_block", lambda *a: calls.append(a[2].dropout_attn) or real(*a)
    )
    runs = []
    for name, until in (("a", None), ("b", 7)):
        t = make_trainer(shakespeare_text, tmp_path / name, 0, 0.3, max_iters=14, eval_interval=7)
        t.fit(until=until)
        runs.append(t)
    # the blocks trained fused, dropout and all (the module path with LMARCH_NATIVE=0)
    assert (0.3 in calls) == native_available()
    resumed = make_trainer(shakespeare_text, tmp_path / "b", 0, 0.3, max_iters=14, eval_interval=7)
    torch.manual_seed(999)
    resumed.fit(resume=True)
    for name, tensor in runs[0].model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_non_finite_loss_stops_with_clear_message(shakespeare_text, tmp_path) -> None:
    """A loss that turns nan at step 8 stops the run; the step-5 checkpoint survives intact."""
    trainer = make_trainer(shakespeare_text, tmp_path, checkpoint_interval=5)
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = causal_lm_loss(model, batch)
        return loss * float("nan") if calls["n"] >= 8 else loss

    trainer.loss_fn = poisoned
    with pytest.raises(NonFiniteLossError, match="loss became nan at iteration 10"):
        trainer.fit()
    import json

    meta = json.loads((find_checkpoint(tmp_path) / "trainer.json").read_text())
    assert meta["step"] == 5


def test_skip_nonfinite_skips_the_bad_step(shakespeare_text, tmp_path) -> None:
    """With skip_nonfinite a nan step leaves the weights exactly as they were."""
    trainer = make_trainer(shakespeare_text, tmp_path, skip_nonfinite=True)
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.loss_fn = lambda model, batch: causal_lm_loss(model, batch) * float("nan")
    loss = trainer.train_step()
    assert math.isnan(loss.item())
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_learning_rate_schedule_exact_values() -> None:
    """Linear warmup, cosine decay to min_lr at lr_decay_iters, flat afterwards."""
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    assert learning_rate_at(0, cfg) == pytest.approx(1e-3 * 1 / 11)
    assert learning_rate_at(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert learning_rate_at(10, cfg) == pytest.approx(1e-3)
    assert learning_rate_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert learning_rate_at(110, cfg) == pytest.approx(1e-4)
    assert learning_rate_at(500, cfg) == pytest.approx(1e-4)


def test_weight_decay_only_on_linear_weights() -> None:
    """Norm gains, biases and the (tied) embedding table are not decayed."""
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8))
    decay, no_decay = parameter_groups(model, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decay_ids}
    assert names == {
        f"blocks.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.qkv", "attn.out", "ffn.fc_in", "ffn.fc_out")
    }
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gradient_accumulation_matches_one_big_batch(shakespeare_text, tmp_path) -> None:
    """Two micro-batches of 4 accumulate to the gradient of the same 8 windows in one batch."""
    acc = make_trainer(
        shakespeare_text, tmp_path / "a", batch_size=4, gradient_accumulation_steps=2
    )
    big = make_trainer(shakespeare_text, tmp_path / "b", batch_size=8)
    big.model.load_state_dict(acc.model.state_dict())
    x1, y1 = acc.train_batches.sample()
    x2, y2 = acc.train_batches.sample()
    acc.train_batches.generator.manual_seed(0)  # replay the same two micro-batches
    batches = iter([(x1, y1), (x2, y2)])
    acc.train_batches.sample = lambda generator=None: next(batches)
    big.train_batches.sample = lambda generator=None: (torch.cat([x1, x2]), torch.cat([y1, y2]))
    for t in (acc, big):
        t.config.grad_clip = 0.0
        t.optimizer.step = lambda: None  # keep the gradients for inspection
        t.optimizer.zero_grad = lambda set_to_none=True: None
        t.train_step()
    for (name, p), q in zip(acc.model.named_parameters(), big.model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
