"""Load on ``lmarch serve``: N concurrent streaming chat clients x M requests each, on loopback.

For each server configuration (by default SmolLM2-135M with continuous batching,
``--max-batch 32``, and one request at a time, ``--max-batch 1``) a fresh ``lmarch serve``
process is started and ``--clients`` asyncio clients each send ``--requests`` streaming
``/v1/chat/completions`` requests one after another (each a different question, greedy,
``max_tokens`` = ``--max-tokens``). Measured per configuration:

- time to first token (TTFT: request sent -> first content chunk) and latency (request sent
  -> ``data: [DONE]``), p50 and p99 over all requests;
- aggregate tokens/s: completion tokens of all requests (from the streams' usage chunk)
  divided by the wall time of the whole load;
- errors: requests that did not end with ``[DONE]`` and a 200 (goal: 0);
- the weights' format each server chose (``--quant auto``: PyTorch's int4 kernel when batching,
  lmarch's native Q4 kernels one at a time; ``--quant`` forces one for both);
- the server's resident memory (VmRSS) once it answers ``/health`` (weights and the slotted
  KV cache are allocated by then) and after the load (goal: no growth beyond noise).

The batching ratio is the batched configuration's tokens/s over the one-at-a-time one.
With ``--peers llama.cpp`` and ``llama-cpp-python`` installed (``pip install .[bench]``), its
OpenAI-compatible server (``python -m llama_cpp.server``) runs the same load on the same GGUF
file; the ratio against it is reported.

    python benchmarks/serve_load.py [--clients 32] [--requests 8] [--max-tokens 64]
                                    [--batches 32,1] [--peers llama.cpp] [--json]

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


def start_server(argv: list[str], url: str, timeout: float = 300) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not answer {url}/health in {timeout} s")


def start_llama_cpp(gguf: Path, url: str, port: int, context: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
            "--n_ctx", str(context)]  # fmt: skip
    env = {**os.environ}
    # its log goes to a file: an unread pipe fills up and blocks the server mid-start
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (open while the server runs)
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"llama.cpp server exited: {log.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("llama.cpp server did not start")


async def one_request(http: httpx.AsyncClient, url: str, model: str, question: str, args) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, first, tokens, pieces, done = time.perf_counter(), None, 0, 0, False
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
                    tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    pieces += 1
                    if first is None:
                        first = time.perf_counter()
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    end = time.perf_counter()
    return {
        "ok": done,
        "ttft_s": (first or end) - sent,
        "latency_s": end - sent,
        # a server that sends no usage chunk (llama-cpp-python) streams one token per piece
        "tokens": tokens if tokens else pieces,
        "error": None if done else "no [DONE]",
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
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_examples": sorted({r["error"] for r in results if not r["ok"]})[:3],
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_s": percentile([r["ttft_s"] for r in ok], 0.5),
        "ttft_p99_s": percentile([r["ttft_s"] for r in ok], 0.99),
        "latency_p50_s": percentile([r["latency_s"] for r in ok], 0.5),
        "latency_p99_s": percentile([r["latency_s"] for r in ok], 0.99),
        "mean_tokens": statistics.mean([r["tokens"] for r in ok]) if ok else 0.0,
    }


def bench_lmarch(batch: int, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "lmarch", "serve", args.model, "--port", str(port),
            "--max-batch", str(batch), "--max-queue", str(args.clients * 2),
            "--context", str(args.context), "--max-tokens", str(args.max_tokens),
            "--quant", args.quant]  # fmt: skip
    proc = start_server(argv, url)
    try:
        quant = httpx.get(url + "/health").json().get("quant")
        before = rss_mib(proc.pid)
        load = asyncio.run(run_load(url, args.model, args))
        after = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
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
    proc = start_llama_cpp(Path(gguf), url, port, args.context)
    try:
        before = rss_mib(proc.pid)
        load = asyncio.run(run_load(url, "smollm2", args))
        after = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"server": "llama-cpp-python", "rss_before_mib": before, "rss_after_mib": after, **load}


def table(rows: list[dict]) -> str:
    head = ("| server | requests | errors | tok/s | TTFT p50 / p99 (s) | latency p50 / p99 (s) "
            "| RSS before -> after (MiB) |")  # fmt: skip
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(
            f"| {r['server']} ({r.get('quant') or '-'}) | {r['requests']} | {r['errors']} "
            f"| {r['tokens_per_s']:.1f} "
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
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    rows = [bench_lmarch(b, args) for b in batches]
    if "llama.cpp" in args.peers:
        peer = bench_llama_cpp(args)
        if peer is not None:
            rows.append(peer)
    summary = {"clients": args.clients, "requests_per_client": args.requests,
               "max_tokens": args.max_tokens, "model": args.model, "rows": rows}  # fmt: skip
    by_batch = {r["server"]: r["tokens_per_s"] for r in rows}
    one = by_batch.get("lmarch max-batch 1")
    if one and len(batches) > 1:
        best = max(b for b in batches if b > 1)
        summary["batching_speedup"] = by_batch[f"lmarch max-batch {best}"] / one
    peer = by_batch.get("llama-cpp-python")
    if peer:
        summary["lmarch_over_llama_cpp"] = (
            max(by_batch[f"lmarch max-batch {b}"] for b in batches) / peer
        )
    print(table(rows))
    for key in ("batching_speedup", "lmarch_over_llama_cpp"):
        if key in summary:
            print(f"{key}: {summary[key]:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
