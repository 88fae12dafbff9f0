"""``lmarch train --nproc N``: start torchrun on this machine, running the same command N times.

The command line is re-invoked as
``python -m torch.distributed.run --standalone --nproc-per-node N -m lmarch ARGV`` with ``--nproc``
taken out of ARGV, so each rank runs the ordinary ``lmarch train`` and finds its place in
torchrun's variables. Only rank 0 speaks (:func:`quiet_other_ranks`); the launcher passes the
ranks' output through and drops torchrun's own failure report, so a refused command still ends
in one line, with exit code 2 when the first rank to fail exited 2 (bad input; torchrun then
stops the others).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["quiet_other_ranks", "relaunch", "start_ranks", "strip_nproc", "torchrun_command"]

# torchrun's agent reports a failed worker with a glog-style line from its multiprocessing API,
# then a traceback and a table of failures: everything from that line on is the agent's
_AGENT_FAILURE = re.compile(rb"^[EW]\d{4} [^\n]*torch/distributed/elastic/[^\n]*", re.M)
_EXIT_CODE = re.compile(rb"exitcode\s*:\s*(-?\d+)")


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command line that runs ``lmarch ARGV`` (``--nproc`` removed) on ``nproc``
    local ranks (``--standalone``: a rendezvous on a free local port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "lmarch",
        *strip_nproc(argv),
    ]


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``lmarch ARGV`` on ``nproc`` local ranks under torchrun; return the exit code (2 when
    the first rank to fail refused its input, as one process would)."""
    env = dict(os.environ)
    # one BLAS thread pool per rank that together fill the cores (torchrun's default is 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if sys.stderr.isatty():
        env.setdefault("TTY_COMPATIBLE", "1")  # rank 0 draws its live progress bar through us
    proc = subprocess.Popen(torchrun_command(nproc, argv), env=env, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    buffer, report = b"", None
    try:
        while chunk := os.read(proc.stderr.fileno(), 65536):
            if report is not None:
                report += chunk
                continue
            buffer += chunk
            found = _AGENT_FAILURE.search(buffer)
            if found:
                _write(buffer[: found.start()])
                report = buffer[found.start() :]
                continue
            cut = buffer.rfind(b"\n") + 1  # hold back a partial line: it may start the report
            if cut == 0 and len(buffer) < 4096 and not buffer.endswith(b"\r"):
                continue
            cut = cut or len(buffer)
            _write(buffer[:cut])
            buffer = buffer[cut:]
        if report is None:
            _write(buffer)
        code = proc.wait()
    except KeyboardInterrupt:
        proc.wait()  # torchrun passes the interrupt to the ranks, which save and stop
        return 130
    if code != 0 and report is not None:
        # torchrun stops the other ranks once one fails: the first failure tells what happened
        root = report.find(b"Root Cause")
        first = _EXIT_CODE.search(report, max(root, 0))
        return 2 if first is not None and int(first.group(1)) == 2 else code
    return code


def _write(data: bytes) -> None:
    if data:
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()


def start_ranks(args: argparse.Namespace, argv: Sequence[str]) -> int | None:
    """What ``lmarch train|finetune`` does before its own work: with ``--nproc N`` outside
    torchrun, run the command on N ranks and return their exit code; otherwise (one process, or
    a rank torchrun started) silence the ranks other than 0 and return None."""
    nproc = getattr(args, "nproc", None)
    if nproc is not None and "LOCAL_RANK" not in os.environ:
        if nproc < 1:
            sys.stderr.write(f"lmarch {args.command}: error: --nproc must be >= 1, got {nproc}\n")
            return 2
        return relaunch(nproc, argv)
    quiet_other_ranks()
    return None


def quiet_other_ranks() -> None:
    """On ranks other than 0 of a torchrun launch, send stdout and stderr to the null device,
    so that one process speaks for all (set ``LMARCH_ALL_RANKS=1`` to hear every rank)."""
    if os.environ.get("RANK", "0") == "0" or os.environ.get("LMARCH_ALL_RANKS") == "1":
        return
    null = open(os.devnull, "w")  # noqa: SIM115 - kept open for the life of the process
    sys.stdout = sys.stderr = null
