"""``lmarch inspect | scaling | attention | logit-lens | vectors-plot``: looking inside models
(:mod:`lmarch.analysis`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from lmarch.errors import LmarchError

if TYPE_CHECKING:
    from lmarch.loading.model import LoadedModel


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the analysis subcommands to the ``lmarch`` parser."""
    from lmarch.cli.main import OneLineParser  # loaded: it is what calls this

    p = sub.add_parser("inspect", help="parameters, FLOPs, KV cache and training memory")
    p.add_argument("model", help="a preset (no weights needed), GGUF file, HF folder or run")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (context)")
    p.add_argument("--batch", type=int, default=1, help="sequences per batch (default: 1)")
    p.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (default: fp32)")
    p.add_argument("--json", action="store_true", help="print the report as JSON, last line")

    s = sub.add_parser("scaling", help="Chinchilla compute-optimal calculator; 'sweep' runs one")
    s.add_argument("--flops", type=_float_list, default=[1e21, 5.76e23],
                   help="training FLOP budget(s), comma-separated (default: 1e21,5.76e23)")  # fmt: skip
    s.add_argument("--params", type=float, default=None, help="also: this model size's D and loss")
    s.add_argument("--json", action="store_true", help="print the plans as JSON, last line")
    ssub = s.add_subparsers(dest="scaling_command", parser_class=OneLineParser)
    w = ssub.add_parser("sweep", help="IsoFLOP sweep of small GPTs on CPU, fitted and plotted")
    w.add_argument("--data", default="shakespeare", help="corpus (shakespeare, a file, a folder)")
    w.add_argument("--budgets", type=_float_list, default=[3e10, 1e11, 3e11],
                   help="training FLOPs per run, comma-separated (default: 3e10,1e11,3e11)")  # fmt: skip
    w.add_argument("--block-size", type=int, default=64, help="context of every run (64)")
    w.add_argument("--batch-size", type=int, default=16, help="sequences per step (16)")
    w.add_argument("--min-steps", type=int, default=20, help="skip shorter runs (20)")
    w.add_argument("--max-shapes", type=int, default=None, help="try only the N smallest GPTs")
    w.add_argument("--val-chars", type=int, default=20000, help="held-out characters scored")
    w.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fastest for tiny GPTs)"
    )
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--out", default="runs/scaling", help="folder for scaling.png and runs.json")
    w.add_argument("--json", action="store_true", help="print the result as JSON, last line")

    a = sub.add_parser("attention", help="heatmaps of attention probabilities on a text")
    a.add_argument("model", help="smollm2-135m, minilm-l6, a GGUF, an HF folder or a run")
    a.add_argument("text", help="the text to read")
    a.add_argument("--layer", type=int, default=0, help="attention layer, 0-based (-1: last)")
    a.add_argument("--head", type=int, default=None, help="one head (default: a grid of all)")
    a.add_argument("--out", default="attention.png", help="the figure (PNG or SVG)")
    a.add_argument("--json", action="store_true", help="print the layer's maps as JSON")

    lens = sub.add_parser("logit-lens", help="each layer's next-token guesses (logit lens)")
    lens.add_argument("model", help="a causal LM (smollm2-135m, a GGUF, a run) or an mlm run")
    lens.add_argument("text", help="the text to read")
    lens.add_argument("--top", type=int, default=3, help="guesses per cell in the table (3)")
    lens.add_argument("--out", default="logit_lens.png", help="the figure (PNG or SVG)")
    lens.add_argument("--json", action="store_true", help="print the table as JSON, last line")

    v = sub.add_parser("vectors-plot", help="2-D PCA plot of chosen word vectors")
    v.add_argument("vectors", help="a vector file (word2vec, GloVe, .vec) or word2vec folder")
    v.add_argument("--words", required=True, help="comma-separated words")
    v.add_argument("--out", default="vectors.png", help="the figure (PNG or SVG)")
    v.add_argument("--json", action="store_true", help="print the coordinates as JSON")


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the inspection report."""
    from lmarch.analysis.inspect import inspect_model, render

    report = inspect_model(args.model, args.seq_len, args.batch, args.precision)
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(render(report))
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    """The calculator, or with ``sweep`` the IsoFLOP experiment."""
    if args.scaling_command == "sweep":
        return _sweep(args)
    from lmarch.analysis.inspect import human
    from lmarch.analysis.scaling import CHINCHILLA, plan

    plans = [plan(c, args.params) for c in args.flops]
    if not plans:
        raise LmarchError("no FLOP budget given", hint="--flops 1e21")
    law = ", ".join(f"{k}={v}" for k, v in CHINCHILLA.items())
    lines = [
        f"Chinchilla (Hoffmann et al. 2022, eq. 2 and 4): L(N, D) = E + A/N^alpha + B/D^beta, {law}",
        f"{'FLOPs C':>10}  {'N_opt':>9} {'D_opt':>9} {'D/N':>6} {'loss':>6}   "
        f"{'20 tok/param: N':>15} {'D':>9} {'loss':>6}",
    ]
    for p in plans:
        lines.append(
            f"{p.flops:>10.3g}  {human(p.n_opt):>9} {human(p.d_opt):>9} {p.d_opt / p.n_opt:>6.1f} "
            f"{p.loss_opt:>6.3f}   {human(p.n_rule):>15} {human(p.d_rule):>9} {p.loss_rule:>6.3f}"
        )
        if p.n_given is not None:
            lines.append(
                f"{'':>10}  N = {human(p.n_given)}: D = C / 6N = {human(p.d_given)},"
                f" loss {p.loss_given:.3f}"
            )
    lines.append("C = 6 N D (Kaplan et al. 2020); loss in nats/token of the paper's MassiveText")
    if args.json:
        print("\n".join(lines), file=sys.stderr)
        print(json.dumps({"law": CHINCHILLA, "plans": [p.as_dict() for p in plans]}))
    else:
        print("\n".join(lines))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from lmarch.analysis.scaling import (
        CHINCHILLA,
        PAPER_EXPONENTS,
        SWEEP_SHAPES,
        SweepConfig,
        run_sweep,
    )
    from lmarch.weights.checkpoint import write_json

    shapes = SWEEP_SHAPES[: args.max_shapes] if args.max_shapes else SWEEP_SHAPES
    cfg = SweepConfig(
        data=args.data, budgets=tuple(args.budgets), shapes=shapes, block_size=args.block_size,
        batch_size=args.batch_size, min_steps=args.min_steps, val_chars=args.val_chars,
        seed=args.seed, threads=args.threads,
    )  # fmt: skip
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("training", total=None)
        result = run_sweep(
            cfg,
            args.out,
            log=lambda line: console.print(line, markup=False),
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    out = console if args.json else Console(highlight=False, soft_wrap=True)
    for budget, best in sorted(result.optimum.items()):
        out.print(
            f"C = {budget:.3g}: best {best['best_shape']} N = {best['best_params']:,} "
            f"D = {best['best_tokens']:,} loss {best['best_loss']:.4f}; "
            f"parabola N_opt = {best['n_opt']:,.0f}",
            markup=False,
        )
    law = result.law
    out.print(
        f"fitted: N_opt ∝ C^{result.exponent_a:.2f}, D_opt ∝ C^{result.exponent_b:.2f}  "
        f"(paper, approach 2: {PAPER_EXPONENTS['a (N_opt ~ C^a), approach 2']}, "
        f"{PAPER_EXPONENTS['b (D_opt ~ C^b), approach 2']})",
        markup=False,
    )
    out.print(
        f"fitted L = {law['E']:.3f} + {law['A']:.3g}/N^{law['alpha']:.2f} + "
        f"{law['B']:.3g}/D^{law['beta']:.2f}  (paper: {CHINCHILLA['E']} + {CHINCHILLA['A']}/"
        f"N^{CHINCHILLA['alpha']} + {CHINCHILLA['B']}/D^{CHINCHILLA['beta']})",
        markup=False,
    )
    out.print(result.note, markup=False)
    write_json(f"{args.out}/runs.json", result.as_dict())
    out.print(f"plot: {result.plot}", markup=False)
    if args.json:
        print(json.dumps(result.as_dict()))
    return 0


def _load_float(spec: str) -> LoadedModel:
    """The model with float weights: attention capture and the lens run the reference layers."""
    from lmarch.loading import load

    return load(spec, quant="none")


def cmd_attention(args: argparse.Namespace) -> int:
    """Write the heatmap (one head, or a grid of all heads of a layer)."""
    from lmarch.analysis.attention_maps import attention_maps, plot_attention

    maps = attention_maps(_load_float(args.model), args.text)
    path = plot_attention(maps, args.layer, args.head, args.out)
    record = maps.layers[args.layer]
    summary = {
        "tokens": maps.tokens,
        "layers": len(maps.layers),
        "layer": args.layer % len(maps.layers),
        "module": record.name,
        "heads": int(record.probs.shape[0]),
        "plot": str(path),
    }
    if args.json:
        probs = record.probs if args.head is None else record.probs[args.head : args.head + 1]
        print(json.dumps({**summary, "probs": probs.tolist()}))
    else:
        print(f"{len(maps.tokens)} tokens: {' '.join(maps.tokens)}")
        print(f"layer {summary['layer']} ({record.name}), {summary['heads']} heads -> {path}")
    return 0


def cmd_logit_lens(args: argparse.Namespace) -> int:
    """Print each layer's top guesses per position and write the figure."""
    from rich.console import Console
    from rich.table import Table

    from lmarch.analysis.lens import logit_lens, plot_lens

    result = logit_lens(_load_float(args.model), args.text, k=args.top)
    path = plot_lens(result, args.out)
    table = Table(title=f"logit lens: each layer's top {args.top} guesses at each position")
    table.add_column("layer")
    for tok in result.tokens:
        table.add_column(tok, overflow="fold")
    for name, row in zip(result.layer_names, result.top_tokens):
        table.add_row(name, *(" ".join(guesses) for guesses in row))
    console = Console(stderr=args.json, highlight=False)
    console.print(table)
    console.print(f"plot: {path}", markup=False)
    if args.json:
        print(json.dumps({**result.as_dict(), "plot": str(path)}))
    return 0


def cmd_vectors_plot(args: argparse.Namespace) -> int:
    """Project the chosen words' vectors to 2-D (PCA) and plot them."""
    from lmarch.analysis.projection import load_word_vectors, plot_projection, project_words

    words = [w.strip() for w in args.words.split(",")]
    found, coords, ratio = project_words(load_word_vectors(args.vectors), words)
    path = plot_projection(found, coords, ratio, args.out)
    if args.json:
        print(
            json.dumps(
                {
                    "words": found,
                    "coords": coords.tolist(),
                    "explained": ratio.tolist(),
                    "plot": str(path),
                }  # fmt: skip
            )
        )
    else:
        for word, (x, y) in zip(found, coords):
            print(f"{word:<20} {x:>9.4f} {y:>9.4f}")
        print(f"PC1 {ratio[0]:.1%}, PC2 {ratio[1]:.1%} of the variance -> {path}")
    return 0


COMMANDS = {
    "inspect": cmd_inspect,
    "scaling": cmd_scaling,
    "attention": cmd_attention,
    "logit-lens": cmd_logit_lens,
    "vectors-plot": cmd_vectors_plot,
}
