"""The ``lmarch`` command: thin subcommands over the library.

Every subcommand parses its options and calls one library function. Problems with the user's
input (unknown preset, missing file, bad option) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

from lmarch.errors import LmarchError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a single line with a hint, exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def _add_sampling_options(
    p: argparse.ArgumentParser, temperature: float = 0.8, max_new_tokens: int = 500
) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=temperature, help="0 means greedy decoding")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p * max prob")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")


def _add_speed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quant",
        choices=["none", "int8", "int4"],
        default="none",
        help="weight-only quantisation for faster CPU decoding (bf16 activations)",
    )


def build_parser() -> OneLineParser:
    """The argument parser for every subcommand."""
    parser = OneLineParser(
        prog="lmarch", description="Language-model architectures from scratch: train, sample, eval."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    t = sub.add_parser("train", help="train a model from a preset on a corpus")
    t.add_argument("--preset", help="model preset (see 'lmarch presets')")
    t.add_argument("--data", default="shakespeare", help="'shakespeare', a .txt, folder or .jsonl")
    t.add_argument("--out", required=True, help="run folder for checkpoints, metrics and plots")
    t.add_argument("--max-iters", type=int, default=None, help="training iterations")
    t.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    t.add_argument("--config", default=None, help="TOML file of settings ([model] / [train])")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    s = sub.add_parser("sample", help="generate text from a trained run folder")
    s.add_argument("run_dir", help="a folder written by 'lmarch train'")
    s.add_argument("--prompt", default="\n", help="text to continue")
    _add_sampling_options(s)

    e = sub.add_parser("eval", help="loss and perplexity of a run on a corpus's validation split")
    e.add_argument("run_dir")
    e.add_argument("--data", default="shakespeare")
    e.add_argument("--json", action="store_true")

    sub.add_parser("presets", help="list model presets with parameter counts")

    g = sub.add_parser("generate", help="continue a raw prompt with a model")
    g.add_argument(
        "model", help="a preset with weights, a .gguf file, an HF folder or a run folder"
    )
    g.add_argument("prompt", help="raw text; special tokens written in it are parsed as such")
    _add_sampling_options(g, temperature=0.0, max_new_tokens=128)
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-text")
    _add_speed_options(g)
    g.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    c = sub.add_parser("chat", help="chat with an instruction-tuned model (/reset, /system, /quit)")
    c.add_argument("model", help="a preset with weights, a .gguf file or an HF folder")
    c.add_argument("--system", default=None, help="system message")
    _add_sampling_options(c, temperature=0.7, max_new_tokens=256)
    _add_speed_options(c)

    d = sub.add_parser("demo", help="train a small GPT on Shakespeare (~3 min) and sample it")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--max-iters", type=int, default=None)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmarch.train.run import parse_set_options, read_config_file, train_run

    console = Console(stderr=args.json)
    overrides: dict = read_config_file(args.config) if args.config else {}
    overrides.update(parse_set_options(args.set))
    if args.max_iters is not None:
        overrides["max_iters"] = args.max_iters
    result = train_run(
        args.preset, args.data, args.out, overrides, resume=args.resume, log=console.print
    )
    console.print(
        f"done: {result.iters} iterations, val loss {result.val_loss:.4f}, "
        f"{result.tokens_per_s:,.0f} tokens/s -> {args.out}"
    )
    if args.json:
        print(json.dumps(result.as_dict()))
    return 0


def _sampling(args: argparse.Namespace):
    from lmarch.generation import SamplingConfig

    return SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
    )


def cmd_sample(args: argparse.Namespace) -> int:
    from lmarch.generation import stream_text
    from lmarch.weights.checkpoint import load_run

    sampling = _sampling(args)
    model, tokenizer, _ = load_run(args.run_dir)
    sys.stdout.write(args.prompt)
    for piece in stream_text(
        model, tokenizer, args.prompt, args.max_new_tokens, sampling, stop=args.stop, seed=args.seed
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lmarch.tasks.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, args.data)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"val loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f} "
            f"over {result['tokens']:,} tokens"
        )
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lmarch.models.registry import PRESETS, count_parameters, preset_config

    table = Table(title="lmarch presets")
    for col in ("preset", "family", "parameters", "tokenizer", "description"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for name, p in PRESETS.items():
        n = count_parameters(preset_config(name))
        table.add_row(name, p.family, f"{n / 1e6:,.2f}M", p.tokenizer, p.description)
    Console().print(table)
    print("char presets are counted at vocab_size 65 (tinyshakespeare); bpe at GPT-2's 50257")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lmarch.generation import GenerationStats
    from lmarch.tasks.generate import generate_text, prepare_for_decoding
    from lmarch.weights.loader import load_model

    sampling = _sampling(args)
    loaded = load_model(args.model)
    prepare_for_decoding(loaded, args.quant)
    stats = GenerationStats()
    pieces = []
    out = sys.stderr if args.json else sys.stdout
    for piece in generate_text(
        loaded,
        args.prompt,
        args.max_new_tokens,
        sampling,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        stop=args.stop,
        stats=stats,
    ):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    if args.json:
        summary = {
            "text": "".join(pieces),
            "token_ids": stats.token_ids,
            "prompt_tokens": stats.prompt_tokens,
            "prefill_tokens_per_s": stats.prefill_tokens_per_s,
            "decode_tokens_per_s": stats.decode_tokens_per_s,
            "load_s": loaded.load_s,
            "stopped_by": stats.stopped_by,
        }
        print(json.dumps(summary))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lmarch.tasks.chat import ChatSession
    from lmarch.tasks.generate import prepare_for_decoding
    from lmarch.weights.loader import load_model

    loaded = load_model(args.model)
    prepare_for_decoding(loaded, args.quant)
    session = ChatSession(loaded, _sampling(args), args.max_new_tokens, args.system, args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{loaded.name}: /reset clears the chat, /system TEXT sets the system message, /quit")
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/quit", "/exit"):
            break
        if text.strip() == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        if text.startswith("/system"):
            session.set_system(text[len("/system") :].strip())
            print("(system message set; conversation cleared)")
            continue
        for piece in session.send(text):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lmarch.tasks.demo import run_demo

    run_demo(args.out, max_iters=args.max_iters)
    return 0


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "presets": cmd_presets,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lmarch`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LmarchError as exc:
        sys.stderr.write(f"lmarch {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"lmarch {args.command}: interrupted (a checkpoint was saved)\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
