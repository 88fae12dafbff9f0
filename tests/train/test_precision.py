"""Mixed precision as a Trainer option: bf16 autocast learning on the CPU next to fp32, the fp16
refusal on the CPU, the settings (``precision``, its old name ``dtype``, ``grad_checkpointing``)
from the command line and through resume, and loss scaling's checkpointed state."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmarch.data.batches import RandomBlockSampler
from lmarch.errors import LmarchError
from lmarch.models import GPT, GPTConfig
from lmarch.tokenizers import CharTokenizer
from lmarch.train.config import TrainConfig, merge_saved_settings
from lmarch.train.trainer import Trainer, _autocast_dtype

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# gpt-char-tiny shrunk to 1 layer, 2 heads, 32 wide, block 32 (as tests/conftest.py's tiny_run)
TINY_GPT = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32"]


def _trainer(text: str, out_dir=None, **overrides) -> Trainer:
    tok = CharTokenizer.from_text(text)
    ids = torch.tensor(tok.encode(text))
    n = int(0.9 * len(ids))
    cfg = TrainConfig(
        **{
            "batch_size": 8, "max_iters": 60, "learning_rate": 3e-3, "warmup_iters": 5,
            "eval_interval": 60, "eval_iters": 4, "log_interval": 20, "seed": 0,
            "device": "cpu", **overrides,
        }
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
    return Trainer(
        model,
        RandomBlockSampler(ids[:n], 32, 8, 0),
        RandomBlockSampler(ids[n:], 32, 8, 1),
        cfg,
        out_dir=out_dir,
    )


def test_bf16_learns_and_stays_near_fp32(shakespeare_text) -> None:
    """60 steps on Shakespeare. Measured: fp32 4.146 -> 3.138 nats, bf16 4.146 -> 3.134.
    Asserted: bf16 drops by more than 0.8 nats and ends within 0.05 nats of fp32; its first
    evaluation already differs from fp32's (autocast is on) by less than 0.01."""
    fp32, bf16 = _trainer(shakespeare_text), _trainer(shakespeare_text, precision="bf16")
    assert fp32.autocast_dtype is None and bf16.autocast_dtype is torch.bfloat16
    before32, before16 = fp32.evaluate()["val_loss"], bf16.evaluate()["val_loss"]
    assert before32 != before16 and abs(before32 - before16) < 0.01
    after32, after16 = fp32.fit().val_loss, bf16.fit().val_loss
    assert before16 - after16 > 0.8
    assert abs(after16 - after32) < 0.05, (after16, after32)


def test_fp16_is_refused_on_the_cpu() -> None:
    """In the settings when the device is named, in the Trainer when ``auto`` finds no GPU."""
    with pytest.raises(LmarchError, match="precision fp16 needs a CUDA device") as err:
        TrainConfig(precision="fp16", device="cpu")
    assert err.value.hint == "use precision=bf16 on the CPU"
    with pytest.raises(LmarchError, match=r"precision fp16 needs a CUDA device .*, not cpu"):
        _autocast_dtype("fp16", torch.device("cpu"))
    assert _autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert _autocast_dtype("fp32", torch.device("cpu")) is None


def test_settings_are_checked() -> None:
    with pytest.raises(LmarchError, match=r"precision must be one of \['fp32', 'bf16', 'fp16'\]"):
        TrainConfig(precision="half")
    with pytest.raises(LmarchError, match="grad_checkpointing must be true or false"):
        TrainConfig(grad_checkpointing="yes")
    with pytest.raises(LmarchError, match=r"dtype must be one of \['float32', 'bfloat16'\]"):
        TrainConfig(dtype="float16")
    with pytest.raises(LmarchError, match="dtype='bfloat16' contradicts precision='fp16'"):
        TrainConfig(dtype="bfloat16", precision="fp16", device="cuda")
    # the old name folds into the new one, so a saved config carries one choice
    old = TrainConfig(dtype="bfloat16")
    assert (old.precision, old.dtype) == ("bf16", None)
    assert TrainConfig(dtype="float32").precision == "fp32"
    # on resume, a precision given under either name replaces the saved one
    assert merge_saved_settings({"dtype": "bfloat16", "seed": 3}, {"precision": "fp32"}) == {
        "seed": 3,
        "precision": "fp32",
    }
    assert merge_saved_settings({"precision": "bf16"}, {"max_iters": 9}) == {
        "precision": "bf16",
        "max_iters": 9,
    }


def test_cli_set_precision_and_checkpointing(small_text_file, tmp_path, cli) -> None:
    """``--set precision=bf16 --set grad_checkpointing=true`` train and are saved; a bad value
    and fp16 on the CPU are one line each, exit 2."""
    out = tmp_path / "run"
    args = ["train", "--preset", "gpt-char-tiny", "--data", small_text_file, *TINY_GPT]
    args += ["--max-iters", "4", "--eval-interval", "4", "--eval-iters", "1"]
    summary = cli.json(
        *args, "--out", out, "--set", "precision=bf16", "--set", "grad_checkpointing=true"
    )
    assert summary["iters"] == 4
    saved = json.loads((out / "config.json").read_text())["train"]
    assert (saved["precision"], saved["dtype"], saved["grad_checkpointing"]) == ("bf16", None, True)
    line = cli.error(*args, "--out", tmp_path / "b", "--set", "precision=fp8")
    assert "TrainConfig.precision must be one of ['fp32', 'bf16', 'fp16'], got 'fp8'" in line
    line = cli.error(
        *args, "--out", tmp_path / "c", "--set", "precision=fp16", "--set", "device=cpu"
    )
    assert "precision fp16 needs a CUDA device" in line


def test_resume_of_a_run_folder_with_the_old_dtype(tiny_run, tmp_path, cli) -> None:
    """A config.json written before ``precision`` existed (``"dtype": "bfloat16"``, no
    precision or grad_checkpointing) resumes as bf16; ``--set precision=fp32`` overrides it."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    config = json.loads((out / "config.json").read_text())
    for key in ("precision", "grad_checkpointing"):
        del config["train"][key]
    config["train"]["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config))
    assert cli.json("train", "--out", out, "--resume", "--max-iters", "31")["iters"] == 31
    assert json.loads((out / "config.json").read_text())["train"]["precision"] == "bf16"
    (out / "config.json").write_text(json.dumps(config))
    resumed = ["train", "--out", out, "--resume", "--max-iters", "32"]
    assert cli.json(*resumed, "--set", "precision=fp32")["iters"] == 32
    assert json.loads((out / "config.json").read_text())["train"]["precision"] == "fp32"


def _scaled(text: str, out_dir, **overrides) -> Trainer:
    """A Trainer running the fp16 path's loss-scaling steps (scale, unscale, clip, step,
    update) with fp32 arithmetic: a CPU GradScaler attached by hand, as no GPU is here."""
    trainer = _trainer(text, out_dir, max_iters=8, eval_interval=4, **overrides)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    return trainer


def test_loss_scaling_is_exact_and_resumes(shakespeare_text, tmp_path) -> None:
    """A power-of-two loss scale changes no fp32 gradient bit, so the scaled run equals the
    plain one; the scale (grown 2x every 3 clean steps) is saved with the checkpoint and a
    resumed run continues bit-identically."""
    text = shakespeare_text[:50_000]
    plain = _trainer(text, None, max_iters=8, eval_interval=4)
    straight = _scaled(text, None)
    for trainer in (plain, straight):
        trainer.fit()
    assert straight.scaler.get_scale() == 2.0**12  # grown after steps 3 and 6
    for name, value in plain.model.state_dict().items():
        assert torch.equal(value, straight.model.state_dict()[name]), name

    first = _scaled(text, tmp_path)
    first.fit(until=4)
    assert first.scaler.get_scale() == 2.0**11
    second = _scaled(text, tmp_path)
    second.fit(resume=True)
    assert second.scaler.get_scale() == 2.0**12 and second.step == 8
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name


def test_resume_refuses_another_preset(tiny_run, cli) -> None:
    """``--resume`` continues the run as it was started: naming another preset is refused
    (it used to be ignored silently)."""
    line = cli.error("train", "--preset", "llama-tiny", "--out", tiny_run, "--resume")
    assert "holds a run of preset 'gpt-char-tiny', not 'llama-tiny'" in line
