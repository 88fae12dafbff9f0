"""``lmarch caption train|run|eval`` (a BLIP-style captioner, :mod:`lmarch.tasks.caption`) and
``lmarch flamingo train|ask|eval`` (a frozen GPT with Flamingo layers answering questions about
images, :mod:`lmarch.tasks.flamingo`), both on the generated shapes."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _add_options(p: argparse.ArgumentParser, defaults: Any, options: tuple) -> None:
    for name, kind, text in options:
        p.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=kind, default=getattr(defaults, name),
            help=f"{text} (default: {getattr(defaults, name)})",
        )  # fmt: skip


_SHARED = (
    ("steps", int, "training steps"),
    ("batch_size", int, "images per step"),
    ("learning_rate", float, "peak AdamW rate"),
    ("n_embd", int, "width of the image and text models"),
    ("n_layer", int, "blocks per model"),
    ("n_head", int, "attention heads"),
    ("image_size", int, "image side in pixels"),
    ("seed", int, "seed of the weights and the images"),
)


# each command's help, its training help and options beyond the shared ones, the subcommand
# that uses a trained model (name, help) and the help of its eval
_TASKS = {
    "caption": (
        "BLIP-style image captioner (train, run, eval)",
        "train a captioner on the generated shapes, then evaluate",
        (("itm_weight", float, "ITM loss weight"),),
        ("run", "caption image files"),
        "exact match, BLEU and ITM accuracy on a shapes split",
    ),
    "flamingo": (
        "Flamingo-style adapter: a frozen GPT answers about images",
        "train a text GPT, freeze it, train the adapter, evaluate",
        (("clip_steps", int, "steps of the CLIP whose image tower is frozen"),
         ("lm_steps", int, "steps of the text-only GPT"),
         ("n_latents", int, "visual tokens from the perceiver resampler")),
        ("ask", "answer a question about image files"),
        "answer accuracy on a shapes split, with its baselines",
    ),
}  # fmt: skip


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``caption`` and ``flamingo`` with their subcommands to the ``lmarch`` parser."""
    from lmarch.tasks.caption import CaptionTrainConfig
    from lmarch.tasks.flamingo import FlamingoTrainConfig

    defaults = {"caption": CaptionTrainConfig(), "flamingo": FlamingoTrainConfig()}
    for name, (text, train_text, options, (use, use_text), eval_text) in _TASKS.items():
        g = sub.add_parser(name, help=text)
        gsub = g.add_subparsers(dest=f"{name}_command", required=True, parser_class=type(g))
        t = gsub.add_parser("train", help=train_text)
        t.add_argument("--out", required=True, help="run folder to write")
        _add_options(t, defaults[name], (*_SHARED, *options))
        u = gsub.add_parser(use, help=use_text)
        e = gsub.add_parser("eval", help=eval_text)
        for q in (u, e):
            q.add_argument("model", help=f"a 'lmarch {name} train' run folder")
        u.add_argument("--image", action="append", required=True, help="an image file (repeatable)")
        if name == "flamingo":
            t.add_argument(
                "--clip", default=None,
                help="use this 'lmarch clip train' run's image tower (default: train one first)",
            )  # fmt: skip
            u.add_argument("--question", required=True, help="e.g. 'what colour is the circle?'")
        for q in (t, e):
            q.add_argument(
                "--split", default="test", choices=["test", "heldout"],
                help="split to evaluate on (test: pairs seen in training; heldout: unseen pairs)",
            )  # fmt: skip
            q.add_argument("--n", type=int, default=200, help="images to evaluate (default: 200)")
        for q in (t, u, e):
            q.add_argument(
                "--json", action="store_true", help="print a JSON summary as the last line"
            )


def _progress(console, label: str, total: int):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), TextColumn("{task.fields[loss]}"))
    bar = Progress(*columns, TimeRemainingColumn(), console=console, transient=True)
    return bar, bar.add_task(label, total=total, loss="")


def _config(cls, args: argparse.Namespace):
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


# the line each eval prints, filled from its summary
_EVAL_LINES = {
    "caption": "{n} {split} shapes: exact match {exact_match:.1%}, BLEU {bleu:.1f} (most "
    "frequent caption '{baseline_caption}': {baseline_exact_match:.1%}, BLEU "
    "{baseline_bleu:.1f}); ITM accuracy {itm_accuracy:.1%} (chance 50%)",
    "flamingo": "{questions} questions on {images} {split} shapes: accuracy {accuracy:.1%} "
    "(colour {accuracy_colour:.1%}, shape {accuracy_shape:.1%}); without the image "
    "{blind_accuracy:.1%}, chance {chance:.1%}, most frequent answer {majority_accuracy:.1%}",
}


def _evaluate(command: str, model: str, args: argparse.Namespace, console) -> dict:
    """Load ``model`` through :func:`lmarch.load`, evaluate it and print one line."""
    if command == "caption":
        from lmarch.tasks.caption import evaluate_captioner as evaluate
        from lmarch.tasks.caption import load_captioner as load
    else:
        from lmarch.tasks.flamingo import evaluate_flamingo as evaluate
        from lmarch.tasks.flamingo import load_flamingo as load
    e = evaluate(load(model), args.split, args.n)
    console.print(_EVAL_LINES[command].format(**e), markup=False)
    return e


def _caption_train(args: argparse.Namespace, console) -> dict:
    from lmarch.tasks.caption import CaptionTrainConfig, train_captioner

    config = _config(CaptionTrainConfig, args)
    bar, task = _progress(console, "caption train", config.steps)
    with bar:
        summary = train_captioner(
            config,
            args.out,
            progress=lambda step, loss: bar.update(task, completed=step, loss=f"loss {loss:.3f}"),
        )
    summary["eval"] = _evaluate("caption", args.out, args, console)
    return summary


def _caption_run(args: argparse.Namespace, console) -> dict:
    from lmarch.tasks.caption import load_captioner

    run = load_captioner(args.model)
    captions = run.caption(run.preprocessor(args.image))
    for path, caption in zip(args.image, captions):
        console.print(f"{path}: {caption}", markup=False)
    return {"captions": [{"image": p, "caption": c} for p, c in zip(args.image, captions)]}


def _flamingo_train(args: argparse.Namespace, console) -> dict:
    from lmarch.tasks.flamingo import FlamingoTrainConfig, train_flamingo

    config = _config(FlamingoTrainConfig, args)
    clip_steps = 0 if args.clip else config.clip_steps
    offsets = {"clip": 0, "lm": clip_steps, "adapter": clip_steps + config.lm_steps}
    total = clip_steps + config.lm_steps + config.steps
    bar, task = _progress(console, "flamingo train", total)
    with bar:
        summary = train_flamingo(
            config,
            args.out,
            progress=lambda stage, step, loss: bar.update(
                task,
                completed=offsets[stage] + step,
                loss=f"{stage} loss {loss:.3f}",
            ),
            clip=args.clip,
        )
    summary["eval"] = _evaluate("flamingo", args.out, args, console)
    return summary


def _flamingo_ask(args: argparse.Namespace, console) -> dict:
    from lmarch.tasks.flamingo import load_flamingo

    run = load_flamingo(args.model)
    answers = run.answer(run.preprocessor(args.image), [args.question] * len(args.image))
    for path, answer in zip(args.image, answers):
        console.print(f"{path}: {answer}", markup=False)
    return {"question": args.question,
            "answers": [{"image": p, "answer": a} for p, a in zip(args.image, answers)]}  # fmt: skip


_HANDLERS = {
    "caption": {"train": _caption_train, "run": _caption_run},
    "flamingo": {"train": _flamingo_train, "ask": _flamingo_ask},
}


def _run(args: argparse.Namespace, command: str) -> int:
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    sub = getattr(args, f"{command}_command")
    if sub == "eval":
        summary = _evaluate(command, args.model, args, console)
    else:
        summary = _HANDLERS[command][sub](args, console)
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    """Run ``lmarch caption train|run|eval``."""
    return _run(args, "caption")


def cmd_flamingo(args: argparse.Namespace) -> int:
    """Run ``lmarch flamingo train|ask|eval``."""
    return _run(args, "flamingo")


COMMANDS = {"caption": cmd_caption, "flamingo": cmd_flamingo}
