"""``lmarch serve``: an OpenAI-compatible HTTP API and web playground (:mod:`lmarch.serve`)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``lmarch`` parser."""
    s = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a web playground"
    )
    s.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a causal LM: preset (smollm2-135m), .gguf, HF or run folder (optional with --embed)",
    )
    s.add_argument(
        "--embed", default=None, help="a sentence encoder for /v1/embeddings (minilm-l6)"
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    s.add_argument(
        "--api-key",
        default=os.environ.get("LMARCH_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $LMARCH_API_KEY, which keeps the "
        "key out of the process list)",
    )
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together (8)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait (64)")
    s.add_argument(
        "--context", type=int, default=2048, help="tokens per request, prompt + reply (2048)"
    )
    s.add_argument("--max-tokens", type=int, default=1024, help="most new tokens a request gets")
    s.add_argument(
        "--max-body", type=int, default=1 << 20, help="largest request body in bytes (1 MiB)"
    )
    s.add_argument("--quant", default="auto", help="as 'lmarch generate --quant' (default: auto)")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run ``lmarch serve``: load the models, then serve until Ctrl-C."""
    from lmarch.errors import LmarchError

    try:
        from lmarch.serve.server import serve_forever
        from lmarch.serve.state import ServeLimits, check_limits, load_state
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastapi", "uvicorn", "starlette"):
            raise
        raise LmarchError(
            f"lmarch serve needs {exc.name}", hint="pip install 'lmarch[serve]'"
        ) from None

    if args.model is None and args.embed is None:
        raise LmarchError("nothing to serve", hint="give a MODEL, --embed MODEL, or both")
    if not 1 <= args.port <= 65535:
        raise LmarchError(f"--port must lie in 1..65535, got {args.port}")
    _check_host(args.host)
    limits = ServeLimits(
        context=args.context,
        max_tokens=args.max_tokens,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body,
    )
    check_limits(limits)
    from rich.console import Console

    what = " and ".join(m for m in (args.model, args.embed) if m)
    with Console(stderr=True).status(f"loading {what}"):
        state = load_state(
            args.model, limits, embed=args.embed, api_key=args.api_key, quant=args.quant
        )
    if args.host not in LOOPBACK and args.api_key is None:
        sys.stderr.write(
            f"lmarch serve: notice: listening on {args.host} without --api-key: anyone who can "
            "reach this address can use the model\n"
        )
    served = ", ".join(n for n in (state.names[:1] + state.embed_names[:1]) if n)
    sys.stderr.write(
        f"lmarch serve: {served} on http://{args.host}:{args.port} (playground at /, API at /v1; "
        f"batch {state.limits.max_batch}, context {state.limits.context}); Ctrl-C stops\n"
    )
    serve_forever(state, args.host, args.port)
    return 0


def _check_host(host: str) -> None:
    """Refuse a --host that is neither a name nor an IP address."""
    from lmarch.errors import LmarchError

    if host in LOOPBACK or host == "0.0.0.0":
        return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not host or any(c.isspace() or c in "/:@" for c in host):
            raise LmarchError(f"--host {host!r} is not an address or a host name") from None


COMMANDS = {"serve": cmd_serve}
