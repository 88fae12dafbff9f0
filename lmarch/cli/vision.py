"""``lmarch clip train|zero-shot|retrieve``: CLIP on the generated shapes and on photographs
(:mod:`lmarch.tasks.clip`)."""

from __future__ import annotations

import argparse
import json


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``clip`` and its subcommands to the ``lmarch`` parser."""
    from lmarch.tasks.clip import ClipTrainConfig

    defaults = ClipTrainConfig()
    g = sub.add_parser(
        "clip", help="CLIP: contrastive image-text model (train, zero-shot, retrieve)"
    )
    gsub = g.add_subparsers(dest="clip_command", required=True, parser_class=type(g))
    t = gsub.add_parser("train", help="train a small CLIP on the generated shapes, then evaluate")
    t.add_argument("--out", required=True, help="run folder to write")
    for name, kind, text in (
        ("steps", int, "training steps"),
        ("batch_size", int, "image-caption pairs per step"),
        ("learning_rate", float, "peak AdamW rate (warmup, then cosine)"),
        ("n_embd", int, "width of both towers and the joint space"),
        ("n_layer", int, "blocks per tower"),
        ("n_head", int, "attention heads"),
        ("image_size", int, "image side in pixels"),
        ("seed", int, "seed of the weights and the images"),
    ):
        t.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=kind, default=getattr(defaults, name),
            help=f"{text} (default: {getattr(defaults, name)})",
        )  # fmt: skip
    t.add_argument("--eval-n", type=int, default=200, help="images per evaluation (default: 200)")
    z = gsub.add_parser("zero-shot", help="classify images by the closest label text")
    z.add_argument("model", help="a 'lmarch clip train' run or a Hugging Face CLIP folder")
    z.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    z.add_argument(
        "--labels", default=None,
        help="comma-separated labels (default: the shapes' 12 colour-shape pairs)",
    )  # fmt: skip
    z.add_argument("--template", default="{}", help="text made of each label (default: '{}')")
    z.add_argument(
        "--split", default=None, choices=["test", "heldout"],
        help="without --image: accuracy on this split of one-object shapes",
    )  # fmt: skip
    z.add_argument("--n", type=int, default=200, help="shapes images to score (default: 200)")
    r = gsub.add_parser("retrieve", help="image <-> text recall@1/5, or rank images for a text")
    r.add_argument("model", help="a 'lmarch clip train' run or a Hugging Face CLIP folder")
    r.add_argument("--text", default=None, help="rank the --image files for this text")
    r.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    r.add_argument("--n", type=int, default=200, help="two-object test shapes (default: 200)")
    for q in (t, z, r):
        q.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def _train(args: argparse.Namespace, console) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from lmarch.tasks.clip import ClipTrainConfig, evaluate_shapes, load_clip, train_clip

    config = ClipTrainConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
        image_size=args.image_size, seed=args.seed,
    )  # fmt: skip
    columns = (TextColumn("clip train"), BarColumn(), TextColumn("{task.fields[loss]}"))
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("train", total=config.steps, loss="")
        summary = train_clip(
            config,
            args.out,
            progress=lambda step, loss: bar.update(task, completed=step, loss=f"loss {loss:.3f}"),
        )
    summary["eval"] = evaluate_shapes(load_clip(args.out), n=args.eval_n, seed=args.seed)
    e = summary["eval"]
    console.print(
        f"loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f} in "
        f"{summary['train_s']:.0f} s; zero-shot {e['zero_shot_test']:.1%} (held-out pairs "
        f"{e['zero_shot_heldout']:.1%}, chance {e['chance']:.1%}); image->text R@1 "
        f"{e['image_to_text_r1']:.1%} R@5 {e['image_to_text_r5']:.1%} -> {args.out}",
        markup=False,
    )
    return summary


def _labels(args: argparse.Namespace) -> list[str]:
    from lmarch.data.shapes import all_pairs, describe
    from lmarch.errors import LmarchError

    if args.labels is None:
        return [describe(p) for p in all_pairs()]
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    if len(labels) < 2:
        raise LmarchError("give at least two labels", hint="--labels 'a cat,a dog'")
    return labels


def _zero_shot(args: argparse.Namespace, console) -> dict:
    from lmarch.data.shapes import shapes_dataset, to_pixels
    from lmarch.errors import LmarchError
    from lmarch.tasks.clip import load_clip, zero_shot

    if "{}" not in args.template:
        raise LmarchError("--template must hold {} where the label goes", hint="'a photo of {}'")
    run = load_clip(args.model)
    labels = _labels(args)
    texts = [args.template.replace("{}", label) for label in labels]
    if args.image:
        probs = zero_shot(run, run.preprocessor(args.image), texts)
        rows = []
        for path, p in zip(args.image, probs.tolist()):
            best = max(range(len(labels)), key=lambda i: p[i])
            console.print(f"{path}: {labels[best]} ({p[best]:.1%})", markup=False)
            rows.append({"image": path, "label": labels[best], "probs": dict(zip(labels, p))})
        return {"images": rows}
    if args.split is None:
        raise LmarchError("give --image files or a --split of the shapes set")
    if args.n < 1:
        raise LmarchError(f"--n must be at least 1, got {args.n}")
    examples = shapes_dataset(args.n, 0, args.split, 1, run.model.config.vision.image_size)
    probs = zero_shot(run, to_pixels(examples), texts)
    predicted = [labels[i] for i in probs.argmax(dim=1).tolist()]
    accuracy = sum(p == e.caption for p, e in zip(predicted, examples)) / args.n
    console.print(f"zero-shot accuracy on {args.n} {args.split} shapes: {accuracy:.1%}")
    return {"split": args.split, "n": args.n, "accuracy": accuracy, "labels": len(labels)}


def _retrieve(args: argparse.Namespace, console) -> dict:
    from lmarch.errors import LmarchError
    from lmarch.tasks.clip import evaluate_shapes, load_clip, rank_images

    run = load_clip(args.model)
    if args.text is not None:
        ranked = rank_images(run, args.text, args.image)
        for place, (i, sim) in enumerate(ranked, 1):
            console.print(f"{place}. {args.image[i]}  cosine {sim:.4f}", markup=False)
        return {
            "text": args.text,
            "ranking": [{"image": args.image[i], "cosine": s} for i, s in ranked],
        }
    if args.image:
        raise LmarchError("--image needs --text to rank the images for")
    e = evaluate_shapes(run, n=args.n)
    keys = ("image_to_text_r1", "image_to_text_r5", "text_to_image_r1", "text_to_image_r5")
    console.print(
        f"{args.n} test shapes: image->text R@1 {e['image_to_text_r1']:.1%} R@5 "
        f"{e['image_to_text_r5']:.1%}; text->image R@1 {e['text_to_image_r1']:.1%} R@5 "
        f"{e['text_to_image_r5']:.1%}"
    )
    return {"n": args.n, **{k: e[k] for k in keys}}


def cmd_clip(args: argparse.Namespace) -> int:
    """Run ``lmarch clip train|zero-shot|retrieve``."""
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    run = {"train": _train, "zero-shot": _zero_shot, "retrieve": _retrieve}[args.clip_command]
    summary = run(args, console)
    if args.json:
        print(json.dumps(summary))
    return 0


COMMANDS = {"clip": cmd_clip}
