"""``lmarch consolidate RUN --out DIR``: a sharded (FSDP) run folder gathered into a single-process
one (:func:`lmarch.train.sharded_checkpoint.consolidate_run`)."""

from __future__ import annotations

import argparse
import json
import sys


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``consolidate`` to the ``lmarch`` parser."""
    p = sub.add_parser(
        "consolidate",
        help="turn an --strategy fsdp run's sharded checkpoint into a single-process run folder",
    )
    p.add_argument("run_dir", help="a run folder trained with --strategy fsdp")
    p.add_argument("--out", required=True, help="the new run folder (model.safetensors, ...)")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def cmd_consolidate(args: argparse.Namespace) -> int:
    """Run ``lmarch consolidate``."""
    from lmarch.train.sharded_checkpoint import consolidate_run
    from lmarch.weights.checkpoint import read_json

    ckpt = consolidate_run(args.run_dir, args.out)
    step = read_json(ckpt / "trainer.json")["step"]
    line = f"consolidated {args.run_dir} (iteration {step}) -> {args.out}"
    if args.json:
        print(line, file=sys.stderr)
        print(json.dumps({"run_dir": str(args.run_dir), "out": str(args.out), "iter": step}))
    else:
        print(line)
    return 0


COMMANDS = {"consolidate": cmd_consolidate}
