"""One rank of the distributed training tests (started N times by tests/train/test_distributed.py
with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, as torchrun would).

It trains the tiny GPT of the test under each strategy the spec lists and writes, per rank, a
JSON of what the test checks (parameter/gradient/optimizer bytes of this rank).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from lmarch.train.distributed import dist_info, teardown
from lmarch.train.parallelize import shard_bytes
from lmarch.train.trainer import Trainer, causal_lm_loss

sys.path.insert(0, str(Path(__file__).parent))
from dist_setup import make_model, make_samplers, train_config  # noqa: E402


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
        t0 = time.perf_counter()
        trainer.fit(resume=run.get("resume", False), until=run.get("until"))
        print(run["name"], time.perf_counter() - t0, flush=True)
        if run.get("measure"):
            # one more backward so that the gradients exist to be counted
            loss = causal_lm_loss(trainer._forward_model, trainer.train_batches.sample())
            loss.backward()
            b = shard_bytes(trainer.model, trainer.optimizer)
            report[run["name"]] = {"params": b.params, "grads": b.grads, "optim": b.optimizer}
            if cfg.strategy == "fsdp":
                local = [p.to_local().dtype for p in trainer.model.parameters()]
                report[run["name"]]["param_dtypes"] = sorted({str(d) for d in local})
    info = dist_info()
    (root / f"report{info.rank}.json").write_text(json.dumps(report))
    teardown()


if __name__ == "__main__":
    main(sys.argv[1])
