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
        choices=["auto", "none", "int8", "int4", "q8", "q4"],
        default="auto",
        help="auto (default): a GGUF's own Q4 blocks on lmarch's native kernels when the file "
        "has them (float32 otherwise); none = float32; q4 / q8 = llama.cpp's Q4_1 / Q8_0 "
        "blocks on the native kernels; int4 / int8 = PyTorch's weight-only kernels",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (for --quant int4/int8; q4/q8 layers run natively)",
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
    t.add_argument(
        "--objective",
        choices=["clm", "mlm", "rtd"],
        default=None,
        help="next-token (decoders), masked LM or ELECTRA replaced-token detection (BERT family)",
    )
    t.add_argument("--whole-word", action="store_true", help="whole-word masking (mlm/rtd)")
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

    k = sub.add_parser("classify", help="fine-tune an encoder to classify text, or use one")
    ksub = k.add_subparsers(dest="classify_command", required=True, parser_class=OneLineParser)
    kt = ksub.add_parser("train", help="fine-tune + TF-IDF baseline; accuracy, macro-F1, PNG")
    kt.add_argument("--model", default="minilm-l6", help="encoder: preset, HF folder, mlm/rtd run")
    kt.add_argument("--data", required=True, help="a .jsonl of {text, label} or shakespeare-genre")
    kt.add_argument("--out", required=True, help="run folder for the classifier and its report")
    kt.add_argument("--epochs", type=float, default=3.0)
    kt.add_argument("--batch-size", type=int, default=16)
    kt.add_argument("--lr", type=float, default=5e-5, help="peak learning rate")
    kt.add_argument("--max-length", type=int, default=128, help="tokens per text (cut beyond)")
    kt.add_argument("--passages-per-play", type=int, default=40, help="shakespeare-genre only")
    kt.add_argument("--seed", type=int, default=0)
    kt.add_argument(
        "--probe-steps",
        type=int,
        default=None,
        help="fit the head alone on frozen features first (LP-FT); default: only for runs "
        "under 100 steps; 0 never",
    )
    kt.add_argument("--no-baseline", action="store_true", help="skip the TF-IDF baseline")
    kt.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    kp = ksub.add_parser("predict", help="label texts with a trained classifier")
    kp.add_argument("run_dir", help="a folder written by 'lmarch classify train'")
    kp.add_argument("texts", nargs="+", help="text(s) to classify")
    kp.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    em = sub.add_parser("embed", help="embed each non-empty line of a file")
    em.add_argument("model", help="encoder: a preset with weights (minilm-l6), HF folder, run")
    em.add_argument("file", help="a UTF-8 text file, one sentence a line")
    em.add_argument("--out", required=True, help="VECTORS.npy or VECTORS.safetensors")
    em.add_argument("--batch-size", type=int, default=64)
    em.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    se = sub.add_parser("search", help="the lines of a file nearest to a query (cosine)")
    se.add_argument("model", help="encoder: a preset with weights (minilm-l6), HF folder, run")
    se.add_argument("query", help="the text to search for")
    se.add_argument("--index", required=True, help="a text file whose lines are searched")
    se.add_argument("--top-k", type=int, default=5)
    se.add_argument("--cache", default=None, help="where to keep the index embeddings")
    se.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

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
        args.preset,
        args.data,
        args.out,
        overrides,
        resume=args.resume,
        log=console.print,
        objective=args.objective,
        whole_word=args.whole_word,
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
    from lmarch.loading import load

    sampling = _sampling(args)
    loaded = load(args.run_dir, quant=getattr(args, "quant", "auto"))
    model, tokenizer = loaded.require("causal-lm", "sample").model, loaded.tokenizer
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
    from lmarch.loading import load
    from lmarch.tasks.generate import generate_text, prepare_for_decoding

    sampling = _sampling(args)
    loaded = load(args.model, quant=args.quant).require("causal-lm", "generate")
    prepare_for_decoding(loaded, compile=args.compile)
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
            "quant": loaded.quant,
            "stopped_by": stats.stopped_by,
        }
        print(json.dumps(summary))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lmarch.loading import load
    from lmarch.tasks.chat import ChatSession
    from lmarch.tasks.generate import prepare_for_decoding

    loaded = load(args.model, quant=args.quant).require("causal-lm", "chat")
    prepare_for_decoding(loaded, compile=args.compile)
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


def cmd_classify(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmarch.tasks.classify import ClassifyConfig, predict, train_classifier

    console = Console(stderr=args.json)
    if args.classify_command == "predict":
        results = predict(args.run_dir, args.texts)
        if args.json:
            print(json.dumps(results))
        else:
            for row in results:
                p = row["probabilities"][row["label"]]
                console.print(f"{row['label']}\t{p:.3f}\t{row['text']}", markup=False)
        return 0
    config = ClassifyConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        max_length=args.max_length,
        seed=args.seed,
        probe_steps=args.probe_steps,
    )
    options = {}
    if args.data == "shakespeare-genre":
        options = {
            "train_passages_per_play": args.passages_per_play,
            "test_passages_per_play": args.passages_per_play,
        }
    summary = train_classifier(
        args.model,
        args.data,
        args.out,
        config,
        baseline=not args.no_baseline,
        log=console.print,
        data_options=options,
    )
    line = f"fine-tuned: accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f}"
    if "baseline" in summary:
        b = summary["baseline"]
        line += f"; TF-IDF baseline: accuracy {b['accuracy']:.3f}, macro-F1 {b['macro_f1']:.3f}"
    console.print(line + f" -> {args.out}")
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "per_class"}))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmarch.tasks.embed import embed_file

    summary = embed_file(args.model, args.file, args.out, batch_size=args.batch_size)
    Console(stderr=args.json).print(
        f"{summary['lines']:,} lines -> {summary['dim']}-d vectors in {summary['out']}"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmarch.tasks.embed import search

    hits = search(args.model, args.index, args.query, top_k=args.top_k, cache=args.cache)
    if args.json:
        print(json.dumps(hits))
    else:
        console = Console()
        for hit in hits:
            console.print(
                f"{hit['rank']:>2}. {hit['score']:.4f}  line {hit['line']}: {hit['text']}",
                markup=False,
                highlight=False,
            )
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
    "classify": cmd_classify,
    "embed": cmd_embed,
    "search": cmd_search,
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
