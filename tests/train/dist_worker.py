"""One rank of the distributed training tests (started N times by tests/train/test_distributed.py
with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, as torchrun would).

It trains the tiny GPT of the test under each strategy the spec lists and writes, per rank, a
JSON of what the test checks (parameter/gradient/optimizer bytes of this rank).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lmarch.train.distributed import dist_info, teardown
from lmarch.train.parallelize import shard_bytes
from lmarch.train.trainer import Trainer, causal_lm_loss

sys.path.insert(0, str(Path(__file__).parent))
from dist_setup import TP_MODELS, make_model, make_samplers, train_config  # noqa: E402


def tensor_parallel_checks() -> dict[str, dict[str, float]]:
    """GPT (MHA, biases, GELU MLP) and LLaMA (GQA, RoPE, SwiGLU) split over the ranks by
    ``parallelize(..., "tp")`` against the whole model in this process: the logits, and the
    weights after one clipped AdamW step (gathered, fused rows put back in order), and 10 greedy
    tokens decoded with the KV cache."""
    from lmarch.generation.generate import generate
    from lmarch.models.registry import build_model, get_preset, replace_config
    from lmarch.train.parallelize import (
        clip_grad_norm,
        parallelize,
        tp_full_state_dict,
        tp_optimizer,
    )

    cpu = torch.device("cpu")
    out = {}
    for name, preset, over in TP_MODELS:
        config = replace_config(get_preset(preset).config, **over)
        torch.manual_seed(0)
        whole = build_model(config)
        split = copy.deepcopy(whole)
        parallelize(split, "tp", cpu)
        x = torch.randint(config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
        y = x.roll(-1, 1)
        logits = [m(x) for m in (whole, split)]
        report = {"logits": (logits[0] - logits[1]).abs().max().item()}
        for z in logits:
            F.cross_entropy(z.flatten(0, 1), y.flatten()).backward()
        opt_whole = torch.optim.AdamW(whole.parameters(), lr=1e-3, fused=True)
        opt_split = tp_optimizer(torch.optim.AdamW(split.parameters(), lr=1e-3, fused=True))
        norms = (
            torch.nn.utils.clip_grad_norm_(whole.parameters(), 0.5),
            clip_grad_norm(list(split.parameters()), 0.5),
        )
        report["grad_norm"] = abs(norms[0].item() - norms[1].item())
        opt_whole.step()
        opt_split.step()
        gathered, ref = tp_full_state_dict(split), whole.state_dict()
        report["step"] = max((ref[k] - gathered[k]).abs().max().item() for k in ref)
        prompt = x[:, :4]
        tokens = [generate(m, prompt, 10).tolist() for m in (whole, split)]
        report["greedy_equal"] = tokens[0] == tokens[1]
        # sequence parallel: the norms hold replicated DTensor weights and see sharded positions
        report["sequence_parallel"] = all(
            type(b.norm_attn.weight).__name__ == "DTensor" for b in split.blocks
        )
        out[name] = report
    return out


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    root = Path(spec["root"])
    report: dict = {}
    for run in spec["runs"]:
        model = make_model()
        train, val = make_samplers()
        cfg = train_config(**run["config"])
        trainer = Trainer(model, train, val, cfg, out_dir=root / run["name"], callbacks=[])
        trainer.fit(resume=run.get("resume", False), until=run.get("until"))
        if run.get("measure"):
            # one more backward so that the gradients exist to be counted
            loss = causal_lm_loss(trainer._forward_model, trainer.train_batches.sample())
            loss.backward()
            b = shard_bytes(trainer.model, trainer.optimizer)
            report[run["name"]] = {"params": b.params, "grads": b.grads, "optim": b.optimizer}
            if cfg.strategy == "fsdp":
                local = [p.to_local().dtype for p in trainer.model.parameters()]
                report[run["name"]]["param_dtypes"] = sorted({str(d) for d in local})
        trainer.release()  # DDP's reducer must go before the process group does
    if spec.get("tensor_parallel"):
        report["tp"] = tensor_parallel_checks()
    info = dist_info()
    (root / f"report{info.rank}.json").write_text(json.dumps(report))
    teardown()


if __name__ == "__main__":
    main(sys.argv[1])
