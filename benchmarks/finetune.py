"""Fine-tuning SmolLM2-135M on Shakespeare: what LoRA buys, and what it costs against PEFT.

Three measurements, each in fresh child processes (one case's memory cannot hide another's):

1. **quality**: ``lmarch.tasks.finetune.finetune`` (what ``lmarch finetune`` runs) with LoRA
   (the defaults: rank 4, alpha 8 on every attention and MLP projection) on the bundled plays;
   validation loss on held-out text (the last 10% of every play; the same ``eval_iters``
   batches before and after) in nats, the share of parameters trained, and the minutes taken.
2. **memory**: full fine-tuning vs LoRA vs QLoRA (NF4 base) at the same batch and window, each
   with the real Trainer in a fresh process. Reported: the peak resident set during training
   (``VmHWM`` after a reset once the model is built and one warm-up step has allocated AdamW's
   state: weights + gradients + optimizer + activations) and the process's peak since start
   (loading included: the float32 model exists before it is quantised). The children run
   with glibc's mmap threshold at 128 KiB, so freed float weights go back to the system.
3. **speed**: one training step (forward, backward, AdamW) of LoRA from lmarch
   (:func:`lmarch.peft.add_lora`, from outside the model) and of LoRA from ``peft`` 0.21.2
   (``get_peft_model``) on the same ``transformers`` ``LlamaForCausalLM`` built from the same
   weights (SmolLM2 exported with :func:`lmarch.weights.hf_llama.save_hf_llama`), rank 4 on
   q/k/v/o/gate/up/down, same batch, window and threads. Both adapters get the same A (copied
   from PEFT's), so the first losses must agree (checked to 1e-4); steps alternate between the
   two and the ratio of medians is reported (goal: lmarch <= PEFT). lmarch's own LLaMA with the
   same adapters (fused qkv / gate_up) is timed beside them.

    python benchmarks/finetune.py [--iters 100] [--batch-size 4] [--block-size 128]
        [--eval-iters 16] [--mem-steps 3] [--speed-repeats 7] [--threads N] [--json]
    python benchmarks/finetune.py --tiny    # seconds-long smoke run of every part

``--json`` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_rss import reset_peak, status_kib

MODEL = "smollm2-135m"
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_PATTERN = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
METHODS = ("full", "lora", "qlora")


def _threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def _shakespeare_tokens(tokenizer, chars: int = 400_000):  # type: ignore[no-untyped-def]
    """Token ids of the first ``chars`` characters of the plays' training text."""
    import torch

    from lmarch.data.corpus import load_documents, train_val_split

    train_text, _ = train_val_split(load_documents("shakespeare"), 0.1)
    return torch.tensor(tokenizer.encode(train_text[:chars]), dtype=torch.long)


# ---- 1. quality ---------------------------------------------------------------------------------


def child_quality(args: argparse.Namespace) -> dict:
    """LoRA fine-tuning through the library's own command path; losses before and after."""
    from lmarch.tasks.finetune import finetune

    _threads(args)
    settings = {
        "method": "lora",
        "max_iters": args.iters,
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "eval_iters": args.eval_iters,
        "eval_interval": max(args.iters, 1),
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        r = finetune(MODEL, "shakespeare", Path(out) / "run", settings, callbacks=[], log=print)
    return {
        **r.as_dict(),
        "minutes": (time.perf_counter() - start) / 60,
        "eval_tokens": args.eval_iters * args.batch_size * args.block_size,
    }


# ---- 2. memory ----------------------------------------------------------------------------------


def child_memory(args: argparse.Namespace, method: str) -> dict:
    """Peak resident set of ``method``'s training steps at the benchmark's batch and window."""
    import torch

    import lmarch
    from lmarch.data.batches import RandomBlockSampler
    from lmarch.tasks.finetune import FinetuneConfig, prepare_model
    from lmarch.train.config import TrainConfig
    from lmarch.train.trainer import Trainer

    _threads(args)
    loaded = lmarch.load(MODEL, quant="none")
    tokens = _shakespeare_tokens(loaded.tokenizer, 100_000)
    torch.manual_seed(0)
    _, trainable = prepare_model(loaded, FinetuneConfig(method=method))
    sampler = RandomBlockSampler(tokens, args.block_size, args.batch_size, 0)
    cfg = TrainConfig(batch_size=args.batch_size, max_iters=1000, warmup_iters=0, device="cpu")
    trainer = Trainer(loaded.model, sampler, sampler, cfg)
    trainer.train_step().item()  # warm-up: AdamW's moments are allocated here
    setup_peak = status_kib("VmHWM")  # loading, quantising, the warm-up step
    reset = reset_peak()  # (this resets getrusage's maximum too)
    times = []
    for _ in range(args.mem_steps):
        start = time.perf_counter()
        trainer.train_step().item()
        times.append(time.perf_counter() - start)
    return {
        "method": method,
        "train_peak_mib": status_kib("VmHWM") / 1024,
        "process_peak_mib": max(setup_peak, status_kib("VmHWM")) / 1024,
        "peak_reset": reset,
        "step_s": statistics.median(times),
        "trainable_params": trainable,
    }


# ---- 3. speed against peft ----------------------------------------------------------------------


def child_speed(args: argparse.Namespace, hf_folder: str) -> dict:
    """lmarch LoRA vs PEFT LoRA on one transformers model, steps alternating; lmarch's model too."""
    import copy
    import warnings

    import peft
    import torch
    import transformers

    import lmarch
    from lmarch.peft import add_lora, lora_layers, mark_only_lora_trainable

    warnings.filterwarnings("ignore", category=FutureWarning)
    _threads(args)
    base = transformers.LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    base.config.use_cache = False
    ours_hf = copy.deepcopy(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=HF_TARGETS)
    theirs = peft.get_peft_model(base, config)
    add_lora(ours_hf, HF_PATTERN, rank=4, alpha=8)
    mark_only_lora_trainable(ours_hf)
    # the same A in both (B is zero in both): identical computations
    with torch.no_grad():
        for name, layer in lora_layers(ours_hf).items():
            layer.lora_A.copy_(
                theirs.get_submodule(f"base_model.model.{name}").lora_A.default.weight
            )
    # lmarch's own LLaMA with the same adapters on its fused layers
    loaded = lmarch.load(MODEL, quant="none")
    native = loaded.model
    add_lora(native, r"blocks\.\d+\.(attn|ffn)\.\w+", rank=4, alpha=8)
    mark_only_lora_trainable(native)

    tokens = _shakespeare_tokens(loaded.tokenizer, 50_000)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(len(tokens) - args.block_size - 1, (args.batch_size,), generator=gen)
    batch = torch.stack([tokens[s : s + args.block_size + 1] for s in starts])
    x, y = batch[:, :-1], batch[:, 1:]

    def hf_loss(model):  # type: ignore[no-untyped-def]
        logits = model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    def native_loss(model):  # type: ignore[no-untyped-def]
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    runs = {
        "lmarch_lora_on_hf": (ours_hf, hf_loss),
        "peft_lora_on_hf": (theirs, hf_loss),
        "lmarch_lora_on_lmarch_llama": (native, native_loss),
    }
    optims = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for k, (m, _) in runs.items()
    }
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.speed_repeats + 1):  # the first round is a warm-up
        # the order turns round each time, so no variant always runs after the same one
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for key in order:
            model, loss_fn = runs[key]
            model.train()
            start = time.perf_counter()
            loss = loss_fn(model)
            loss.backward()
            optims[key].step()
            optims[key].zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            if i == 0:
                first[key] = loss.item()
            else:
                times[key].append(elapsed)
    gap = abs(first["lmarch_lora_on_hf"] - first["peft_lora_on_hf"])
    if gap > 1e-4:
        raise SystemExit(f"lmarch and PEFT LoRA disagree on the first loss by {gap}")
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "step_s": medians,
        "first_loss": first,
        "lmarch_over_peft": medians["lmarch_lora_on_hf"] / medians["peft_lora_on_hf"],
        "repeats": args.speed_repeats,
        "threads": torch.get_num_threads(),
        "peft": peft.__version__,
        "transformers": transformers.__version__,
    }


# ---- driver -------------------------------------------------------------------------------------

PASS_ON = (
    "iters",
    "batch_size",
    "block_size",
    "eval_iters",
    "mem_steps",
    "speed_repeats",
    "threads",
)


def _run_child(args: argparse.Namespace, *child: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *child]
    for name in PASS_ON:
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name) or 0)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"case {child} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _export_hf(folder: str) -> None:
    import lmarch
    from lmarch.weights.hf_llama import save_hf_llama

    save_hf_llama(lmarch.load(MODEL, quant="none").model, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100, help="LoRA steps of the quality run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--eval-iters", type=int, default=16, help="held-out batches (quality)")
    parser.add_argument("--mem-steps", type=int, default=3, help="timed steps per memory case")
    parser.add_argument("--speed-repeats", type=int, default=7, help="steps per speed variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument("--parts", default="quality,memory,speed")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--json", action="store_true", help="print one JSON object as last line")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "quality":
            row = child_quality(args)
        elif kind == "memory":
            row = child_memory(args, rest[0])
        else:
            row = child_speed(args, rest[0])
        print(json.dumps(row))
        return
    if args.tiny:
        args.iters, args.batch_size, args.block_size, args.eval_iters = 2, 1, 16, 1
        args.mem_steps, args.speed_repeats = 1, 1

    parts = args.parts.split(",")
    result: dict = {"model": MODEL, "batch_size": args.batch_size, "block_size": args.block_size}
    if "quality" in parts:
        q = _run_child(args, "quality")
        result["quality"] = q
        print(
            f"LoRA, {q['iters']} steps ({q['minutes']:.1f} min): held-out loss "
            f"{q['val_loss_before']:.3f} -> {q['val_loss_after']:.3f} nats "
            f"(-{q['val_loss_drop']:.3f}); {q['trainable_params']:,} of {q['total_params']:,} "
            f"parameters trained ({q['trainable_share']:.3%})"
        )
    if "memory" in parts:
        rows = [_run_child(args, "memory", m) for m in METHODS]
        result["memory"] = rows
        print("| method | peak RSS in training (MiB) | process peak RSS (MiB) | step (s) |")
        print("| --- | ---: | ---: | ---: |")
        for r in rows:
            print(
                f"| {r['method']} | {r['train_peak_mib']:,.0f} | {r['process_peak_mib']:,.0f} | "
                f"{r['step_s']:.2f} |"
            )
    if "speed" in parts:
        with tempfile.TemporaryDirectory() as folder:
            _export_hf(folder)
            s = _run_child(args, "speed", folder)
        result["speed"] = s
        print("| LoRA step (median) | seconds |")
        print("| --- | ---: |")
        for key, value in s["step_s"].items():
            print(f"| {key} | {value:.3f} |")
        print(
            f"lmarch / PEFT step time on the same transformers model: {s['lmarch_over_peft']:.3f}"
        )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
