"""``lmarch export RUN --format hf --out DIR``: a trained model in another project's format.

``--format hf`` writes a folder ``transformers`` loads (:mod:`lmarch.weights.hf_export`): a
text model with its tokenizer, or a CLIP with its tokenizer and image preprocessing.
``--format gguf [--quant f16|q8_0|q4_0]`` writes one llama.cpp file of a LLaMA-family model
(:mod:`lmarch.weights.gguf_export`). Other formats plug in as one more entry of
:data:`EXPORTERS` and of ``--format``'s choices.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

FORMATS = ("hf", "gguf")
GGUF_QUANTS = ("f16", "q8_0", "q4_0")  # lmarch.weights.gguf_export.EXPORT_QUANTS


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` to the ``lmarch`` parser."""
    p = sub.add_parser("export", help="write a run (or any model) in another format (hf, gguf)")
    p.add_argument("model", help="a run folder (lmarch train), an HF folder or a preset")
    p.add_argument(
        "--format",
        choices=FORMATS,
        required=True,
        help="hf: a transformers folder (text models, CLIP); gguf: one llama.cpp file (LLaMA family)",
    )
    p.add_argument(
        "--quant",
        choices=GGUF_QUANTS,
        default=None,
        help="gguf only: how matrices are stored, default f16 (q4_0 keeps the head in q8_0)",
    )
    p.add_argument("--out", required=True, help="the folder (or file) to write")
    p.add_argument("--json", action="store_true", help="print what was written as JSON, last line")


def _export_hf(args: argparse.Namespace) -> dict[str, Any]:
    import lmarch
    from lmarch.weights.hf_export import export_hf_folder

    loaded = lmarch.load(args.model, quant="none")  # float weights: a GGUF is dequantised
    return export_hf_folder(
        loaded.model,
        loaded.tokenizer,
        args.out,
        chat_template=loaded.chat_template,
        bos_token_id=loaded.bos_token_id,
        eos_token_ids=loaded.stop_token_ids,
        quant=loaded.quant,
        preprocessor=loaded.preprocessor,  # an image model's; None for text models
    )


def _export_gguf(args: argparse.Namespace) -> dict[str, Any]:
    import lmarch
    from lmarch.weights.gguf_export import export_gguf_llama

    loaded = lmarch.load(args.model, quant="none")
    quant = args.quant or "f16"
    summary = export_gguf_llama(loaded.model, loaded.tokenizer, args.out, quant, name=loaded.name)
    return {"out": summary.pop("path"), "model_type": f"gguf ({quant})", **summary}


# --format -> the function writing it (returns a JSON-ready summary with "out")
EXPORTERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "hf": _export_hf,
    "gguf": _export_gguf,
}


def cmd_export(args: argparse.Namespace) -> int:
    """Write the model in the asked format and say where."""
    if args.quant is not None and args.format != "gguf":
        from lmarch.errors import LmarchError

        raise LmarchError(f"--quant applies to --format gguf, not {args.format}")
    result = EXPORTERS[args.format](args)
    what = result.get("model_type", args.format)
    print(f"wrote {what} to {result['out']}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


COMMANDS = {"export": cmd_export}
