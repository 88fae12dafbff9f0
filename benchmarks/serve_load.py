"""Load on ``lmarch serve``: N concurrent streaming chat clients x M requests each, on loopback.

For each server configuration (by default SmolLM2-135M with continuous batching,
``--max-batch 32``, and one request at a time, ``--max-batch 1``) a fresh ``lmarch serve``
process is started and ``--clients`` asyncio clients each send ``--requests`` streaming
``/v1/chat/completions`` requests one after another (each a different question, greedy,
``max_tokens`` = ``--max-tokens``). Measured per configuration:

- time to first token (TTFT: request sent -> first content chunk) and latency (request sent
  -> ``data: [DONE]``), p50 and p99 over all requests;
- aggregate tokens/s: completion tokens of all requests divided by the wall time of the whole
  load. Tokens are counted the same way for every server, as the streamed content pieces (one
  piece per generated token, except where a server holds text back for a stop string or an
  unfinished UTF-8 character): llama-cpp-python sends no usage chunk in a stream. lmarch's
  usage count is recorded beside it (``usage_tokens``) as a check on that count;
- errors: requests that did not answer 200, end with ``[DONE]`` and carry a ``finish_reason``
  (a stream cut short without one counts as an error, not as a short answer) (goal: 0);
  empty answers are counted apart;
- the weights' format each server chose (``--quant auto``: PyTorch's int4 kernel when batching,
  lmarch's native Q4 kernels one at a time; ``--quant`` forces one for both);
- the server's resident memory (VmRSS) once it answers ``/health`` (weights and the slotted
  KV cache are allocated by then) and after the load (goal: no growth beyond noise).

The batching ratio is the batched configuration's tokens/s over the one-at-a-time one.
With ``--peers llama.cpp`` and ``llama-cpp-python`` installed (``pip install .[bench]``), its
OpenAI-compatible server (``python -m llama_cpp.server``) runs the same load on the same GGUF
file (same prompts, ``max_tokens``, greedy decoding, thread count); the ratio against it is
reported only when both sides' answers are valid: no errors or empty answers on either side,
mean tokens per request within 20% of each other, and the same greedy answer (its first 16
characters) to at least half of the questions. llama-cpp-python's server runs one request at a
time and by default *interrupts* a running stream as soon as another request waits (the stream
ends with ``[DONE]`` after zero or a few pieces and no ``finish_reason``); under concurrent load
that leaves near-empty answers, so it is started with ``--interrupt_requests False`` (requests
then queue on its lock), ``--logits_all False`` (logits for the last position only, as lmarch
computes them) and lmarch's thread count.
Two ratios come out of it: lmarch's best row over the peer (``lmarch_over_llama_cpp``), and
lmarch one request at a time over the peer, which also serves one at a time
(``one_at_a_time_over_llama_cpp``).

    python benchmarks/serve_load.py [--clients 32] [--requests 8] [--max-tokens 64]
                                    [--batches 32,1] [--peers llama.cpp] [--threads T] [--json]

``--json`` prints one JSON object as the last line; ``--out FILE`` also writes it to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Why is the sky blue?",
    "Write one sentence about the sea.",
    "What do bees make?",
    "How many days are in a week?",
    "Give me a word that rhymes with cat.",
    "What is two plus three?",
]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def server_env(args) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.threads_given:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op threads in the server
    return env


def start_server(argv: list[str], url: str, env: dict[str, str], timeout: float = 300):
    """Start a server whose output goes to a file (an unread pipe fills up and blocks it)."""
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (open while the server runs)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"{argv[2]} exited: {log.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{argv[2]} did not answer {url}/v1/models in {timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_request(http: httpx.AsyncClient, url: str, model: str, question: str, args) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, first, usage, pieces, done = time.perf_counter(), None, None, 0, False
    text, finish = [], None
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "error": f"HTTP {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if not choices:
                    continue
                finish = choices[0].get("finish_reason") or finish
                content = (choices[0].get("delta") or {}).get("content")
                if content:
                    pieces += 1
                    text.append(content)
                    if first is None:
                        first = time.perf_counter()
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    end = time.perf_counter()
    # a stream cut short (llama-cpp-python's interrupt) still ends with [DONE], without a reason
    error = None if finish else "no finish_reason (stream cut short)"
    return {
        "ok": done and finish is not None,
        "error": "no [DONE]" if not done else error,
        "question": question,
        "text": "".join(text),
        "ttft_s": (first or end) - sent,
        "latency_s": end - sent,
        "tokens": pieces,
        "usage_tokens": usage,
    }


async def run_load(url: str, model: str, args) -> dict:
    results: list[dict] = []
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as http:

        async def client(c: int) -> None:
            for r in range(args.requests):
                question = QUESTIONS[(c + r) % len(QUESTIONS)]
                results.append(await one_request(http, url, model, question, args))

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(args.clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    usage = [r["usage_tokens"] for r in ok if r["usage_tokens"] is not None]
    answers: dict[str, str] = {}
    for r in ok:  # the first answer to each question (greedy: they should all agree)
        answers.setdefault(r["question"], r["text"])
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_examples": sorted({r["error"] for r in results if not r["ok"]})[:3],
        "empty_answers": sum(1 for r in ok if r["tokens"] == 0),
        "wall_s": wall,
        "completion_tokens": tokens,
        "usage_tokens": sum(usage) if len(usage) == len(ok) and ok else None,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_s": percentile([r["ttft_s"] for r in ok], 0.5),
        "ttft_p99_s": percentile([r["ttft_s"] for r in ok], 0.99),
        "latency_p50_s": percentile([r["latency_s"] for r in ok], 0.5),
        "latency_p99_s": percentile([r["latency_s"] for r in ok], 0.99),
        "mean_tokens": statistics.mean([r["tokens"] for r in ok]) if ok else 0.0,
        "answers": answers,
    }


def bench_lmarch(batch: int, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "lmarch", "serve", args.model, "--port", str(port),
            "--max-batch", str(batch), "--max-queue", str(args.clients * 2),
            "--context", str(args.context), "--max-tokens", str(args.max_tokens),
            "--quant", args.quant]  # fmt: skip
    proc = start_server(argv, url, server_env(args))
    try:
        quant = httpx.get(url + "/health").json().get("quant")
        before = rss_mib(proc.pid)
        load = asyncio.run(run_load(url, args.model, args))
        after = rss_mib(proc.pid)
    finally:
        stop_server(proc)
    return {"server": f"lmarch max-batch {batch}", "quant": quant, "rss_before_mib": before,
            "rss_after_mib": after, **load}  # fmt: skip


def bench_llama_cpp(args) -> dict | None:
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed: no llama.cpp row", file=sys.stderr)
        return None
    from lmarch.loading.sources import resolve

    gguf = resolve(args.model).path
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # its chat template is the GGUF's own (the one lmarch uses); see the module docstring
    # for why requests must not interrupt each other and the logits of the last position suffice
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
            "--model_alias", "smollm2", "--port", str(port), "--n_ctx", str(args.context),
            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
            "--interrupt_requests", "False", "--logits_all", "False"]  # fmt: skip
    proc = start_server(argv, url, dict(os.environ))
    try:
        before = rss_mib(proc.pid)
        load = asyncio.run(run_load(url, "smollm2", args))
        after = rss_mib(proc.pid)
    finally:
        stop_server(proc)
    return {"server": "llama-cpp-python", "quant": Path(gguf).stem.rsplit(".", 1)[-1],
            "rss_before_mib": before, "rss_after_mib": after, **load}  # fmt: skip


def peer_problems(ours: dict, peer: dict, prefix: int = 16) -> list[str]:
    """Why a tokens/s ratio between two rows would not compare like with like (empty: valid)."""
    problems = []
    for row in (ours, peer):
        if row["errors"] or row["empty_answers"] or not row["mean_tokens"]:
            problems.append(f"{row['server']}: {row['errors']} errors, "
                            f"{row['empty_answers']} empty answers")  # fmt: skip
    if ours["mean_tokens"] and peer["mean_tokens"]:
        ratio = peer["mean_tokens"] / ours["mean_tokens"]
        if not 0.8 <= ratio <= 1.25:
            problems.append(f"mean tokens per request differ: {peer['mean_tokens']:.1f} "
                            f"vs {ours['mean_tokens']:.1f}")  # fmt: skip
    shared = [q for q in ours["answers"] if q in peer["answers"]]
    same = sum(ours["answers"][q][:prefix] == peer["answers"][q][:prefix] for q in shared)
    if 2 * same < len(shared) or not shared:
        problems.append(f"greedy answers agree (first {prefix} characters) on {same} of "
                        f"{len(shared)} questions")  # fmt: skip
    return problems


def table(rows: list[dict]) -> str:
    head = ("| server | requests | errors | tokens/request | tok/s | TTFT p50 / p99 (s) "
            "| latency p50 / p99 (s) | RSS before -> after (MiB) |")  # fmt: skip
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['server']} ({r.get('quant') or '-'}) | {r['requests']} | {r['errors']} "
            f"| {r['mean_tokens']:.1f} | {r['tokens_per_s']:.1f} "
            f"| {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} "
            f"| {r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} "
            f"| {r['rss_before_mib']:.0f} -> {r['rss_after_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8, help="per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--context", type=int, default=512, help="per request (the KV slots)")
    parser.add_argument("--batches", default="32,1", help="--max-batch values to compare")
    parser.add_argument(
        "--quant", default="auto", help="lmarch serve --quant (auto: int4 batched, q4 alone)"
    )
    parser.add_argument("--peers", default="", help="'llama.cpp' to add its server")
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for every server (default: torch's)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    args.threads_given = args.threads is not None
    if args.threads is None:
        import torch  # the count lmarch serve will use, given to the peer too

        args.threads = torch.get_num_threads()
    batches = [int(b) for b in args.batches.split(",") if b]
    rows = [bench_lmarch(b, args) for b in batches]
    if "llama.cpp" in args.peers:
        peer = bench_llama_cpp(args)
        if peer is not None:
            rows.append(peer)
    summary = {"clients": args.clients, "requests_per_client": args.requests,
               "max_tokens": args.max_tokens, "model": args.model, "threads": args.threads,
               "token_count": "streamed content pieces", "rows": rows}  # fmt: skip
    by_name = {r["server"]: r for r in rows}
    one = by_name.get("lmarch max-batch 1")
    if one and one["tokens_per_s"] and len(batches) > 1:
        best = max(b for b in batches if b > 1)
        batched = by_name[f"lmarch max-batch {best}"]
        summary["batching_speedup"] = batched["tokens_per_s"] / one["tokens_per_s"]
    peer = by_name.get("llama-cpp-python")
    if peer:
        ours = max((by_name[f"lmarch max-batch {b}"] for b in batches),
                   key=lambda r: r["tokens_per_s"])  # fmt: skip
        problems = peer_problems(ours, peer)
        summary["peer_problems"] = problems
        if not problems and peer["tokens_per_s"]:
            summary["lmarch_over_llama_cpp"] = ours["tokens_per_s"] / peer["tokens_per_s"]
            if one and one is not ours and not peer_problems(one, peer):
                summary["one_at_a_time_over_llama_cpp"] = one["tokens_per_s"] / peer["tokens_per_s"]
    print(table(rows))
    for key in ("batching_speedup", "lmarch_over_llama_cpp", "one_at_a_time_over_llama_cpp"):
        if key in summary:
            print(f"{key}: {summary[key]:.2f}x")
    for problem in summary.get("peer_problems", []):
        print(f"no ratio against llama-cpp-python: {problem}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
