"""``lmarch inspect``: what a model is made of and what it costs, without loading its weights.

The model is built on the ``meta`` device (shapes, no storage), so a 8B-parameter shape is
inspected in a second on a laptop. The report holds the module tree with the parameters of
each component, FLOPs per token (:mod:`lmarch.analysis.flops`, with PyTorch's own count beside
it), the KV cache per token and the memory of a training step (:mod:`lmarch.analysis.memory`).
A preset needs no weights; a GGUF file, Hugging Face folder or run folder is read for its
config only. Image-text models (CLIP, the captioner, Flamingo) are loaded and counted by part
(:mod:`lmarch.analysis.inspect_vision`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lmarch.analysis.flops import attention_width, count_forward_flops, measure_flops
from lmarch.analysis.inspect_vision import ImageTextReport, inspect_image_text, render_image_text
from lmarch.analysis.memory import (
    PRECISION_BYTES,
    TrainingMemory,
    kv_cache_bytes_per_token,
    training_memory,
)
from lmarch.errors import LmarchError
from lmarch.loading.model import LoadedModel

# their FLOPs are per target token, with a source of the same length
ENCODER_DECODERS = ("t5", "transformer", "bart")


def _hf_config(folder: Path) -> Any:
    from lmarch.weights.hf import read_hf_config

    hf = read_hf_config(folder)
    kind = hf.get("model_type")
    where = str(folder / "config.json")
    if kind == "gpt2":
        from lmarch.weights.hf_gpt2 import gpt_config_from_hf

        return gpt_config_from_hf(hf, where)
    if kind == "llama":
        from lmarch.weights.hf_llama import llama_config_from_hf

        return llama_config_from_hf(hf, where)
    if kind in ("bert", "roberta", "albert", "electra"):
        from lmarch.weights.hf_bert import config_from_hf

        return config_from_hf(hf)
    if kind in ("t5", "mt5"):
        from lmarch.weights.hf_t5 import t5_config_from_hf

        untied = not hf.get("tie_word_embeddings", True)
        return t5_config_from_hf(hf, where, untied_head=untied)
    if kind in ("bart", "marian"):
        from lmarch.weights.hf_bart import bart_config_from_hf

        return bart_config_from_hf(hf, where)
    return None  # let the loader say what it supports


def resolve_config(spec: str) -> tuple[str, Any, str]:
    """(name, model config, one-line description) of ``spec``: any preset (weights or not),
    or whatever :func:`lmarch.load` accepts — a GGUF file, a Hugging Face folder or a run
    folder are read for their config alone; other kinds are loaded."""
    from lmarch.loading.sources import CHUNKED_PRESETS, resolve
    from lmarch.models.registry import PRESETS, config_from_dict, get_preset

    if spec in PRESETS:
        preset = PRESETS[spec]
        return spec, preset.config, f"preset ({preset.use}): {preset.description}"
    plain_name = not {"/", "\\", "."} & set(spec) and spec not in CHUNKED_PRESETS
    if not Path(spec).expanduser().exists() and plain_name:
        get_preset(spec)  # not a path either: the closest preset names as the hint
    source = resolve(spec)  # raises one line for anything lmarch cannot load
    if source.kind == "gguf":
        from lmarch.weights.gguf import read_gguf
        from lmarch.weights.gguf_gemma import gemma3_config_from_gguf
        from lmarch.weights.gguf_llama import llama_config_from_gguf

        gguf = read_gguf(source.path)
        if gguf.metadata.get("general.architecture") == "gemma3":
            return source.name, gemma3_config_from_gguf(gguf), "GGUF file (Gemma 3)"
        return source.name, llama_config_from_gguf(gguf), "GGUF file"
    if source.kind == "run":
        from lmarch.weights.checkpoint import read_json

        run = read_json(source.path / "config.json")
        return (
            source.name,
            config_from_dict(run["model"]),
            f"run folder ({run.get('objective', 'clm')})",
        )
    if source.kind == "hf":
        config = _hf_config(source.path)
        if config is not None:
            return source.name, config, "Hugging Face folder"
    from lmarch.loading import load

    loaded = load(spec, quant="none")
    return loaded.name, loaded.model.config, f"{source.kind} folder"


@dataclass
class TreeRow:
    """One line of the module tree: dotted path, depth, class name, parameters first counted
    here (a tied weight counts where it first appears), and a note ("x 12", "tied")."""

    path: str
    depth: int
    kind: str
    params: int
    note: str = ""


def _same_structure(modules: list[nn.Module]) -> bool:
    shapes = [tuple((n, tuple(p.shape)) for n, p in m.named_parameters()) for m in modules]
    return all(s == shapes[0] for s in shapes) and len({type(m) for m in modules}) == 1


def module_tree(model: nn.Module, max_depth: int = 3) -> list[TreeRow]:
    """The module tree down to ``max_depth``. Each row counts the parameters whose first name
    (in ``named_parameters`` order) lies below it, so tied weights count once and the rows of
    one level add up to their parent. A ModuleList of identically shaped layers is one row
    ("x N") with its first layer's children below it."""
    owner = {id(p): name for name, p in model.named_parameters()}

    def count(module: nn.Module, path: str) -> tuple[int, bool]:
        mine = shared = 0
        for p in {id(p): p for p in module.parameters()}.values():
            if owner[id(p)].startswith(path + "."):
                mine += p.numel()
            else:
                shared += p.numel()
        return mine, shared > 0 and mine == 0

    rows: list[TreeRow] = []

    def walk(module: nn.Module, path: str, depth: int) -> None:
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            kids = list(child.children())
            params, tied = count(child, child_path)
            if isinstance(child, nn.ModuleList) and kids and _same_structure(kids):
                rows.append(
                    TreeRow(child_path, depth, type(kids[0]).__name__, params, f"x {len(kids)}")
                )
                if depth < max_depth:
                    walk(kids[0], f"{child_path}.0", depth + 1)
                continue
            if not kids and not any(True for _ in child.parameters()):
                continue  # dropout, activations: nothing to count
            rows.append(
                TreeRow(child_path, depth, type(child).__name__, params, "tied" if tied else "")
            )
            if depth < max_depth and kids:
                walk(child, child_path, depth + 1)

    walk(model, "", 0)
    return rows


def embedding_parameters(model: nn.Module) -> int:
    """Parameters of the embedding tables (token, position, segment, relative-bias), each
    counted once — what Kaplan et al. 2020 leave out of N."""
    tables = {
        id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding)
    }
    return sum(tables.values())


@dataclass
class InspectReport:
    """Everything ``lmarch inspect`` prints (all counts exact; FLOPs per token)."""

    name: str
    family: str
    description: str
    seq_len: int
    batch: int
    precision: str
    params: int
    embedding_params: int
    tree: list[TreeRow]
    flop_parts: dict[str, float]  # component -> forward FLOPs per token
    forward_flops_per_token: float
    training_flops_per_token: float
    measured_forward_flops_per_token: float  # FlopCounterMode on the meta model
    six_n_per_token: float  # 6 N (non-embedding N), Kaplan's rule
    attention_term_per_token: float  # 12 L T d_attn: the attention FLOPs of training
    kv_cache_bytes_per_token: int
    memory: TrainingMemory
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def non_embedding_params(self) -> int:
        """N of the 6N rule: parameters outside the embedding tables."""
        return self.params - self.embedding_params

    @property
    def flop_agreement(self) -> float:
        """Our forward count / FlopCounterMode's (1.0 = exact)."""
        measured = self.measured_forward_flops_per_token
        return self.forward_flops_per_token / measured if measured else 1.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "seq_len": self.seq_len,
            "batch": self.batch,
            "precision": self.precision,
            "params": self.params,
            "embedding_params": self.embedding_params,
            "non_embedding_params": self.non_embedding_params,
            "tree": [vars(r) for r in self.tree],
            "flops_per_token": {
                "forward": self.forward_flops_per_token,
                "training": self.training_flops_per_token,
                "forward_measured": self.measured_forward_flops_per_token,
                "agreement": self.flop_agreement,
                "six_n": self.six_n_per_token,
                "attention_term": self.attention_term_per_token,
                "parts": self.flop_parts,
            },
            "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token,
            "training_memory_bytes": self.memory.as_dict(),
            "config": self.config,
        }


def _image_text_model(spec: str) -> tuple[LoadedModel, str] | None:
    """An image-text model (CLIP, captioner, Flamingo: loaded) and its description, or None."""
    from lmarch.loading import load
    from lmarch.loading.sources import resolve
    from lmarch.loading.vision import vision_objective
    from lmarch.models.registry import PRESETS

    if spec in PRESETS or not Path(spec).expanduser().is_dir():
        return None
    source = resolve(spec)
    objective = vision_objective(source)
    if objective is None:
        return None
    kind = "Hugging Face folder" if source.kind == "hf" else "run folder"
    return load(spec, quant="none"), f"{kind} ({objective})"


def inspect_model(
    spec: str, seq_len: int | None = None, batch: int = 1, precision: str = "fp32"
) -> InspectReport | ImageTextReport:
    """Inspect ``spec`` (a preset, GGUF file, Hugging Face folder or run folder) for sequences
    of ``seq_len`` tokens (default: the model's context length) in batches of ``batch``; an
    image-text model gets the FLOPs of its parts instead (:mod:`lmarch.analysis.inspect_vision`)."""
    from lmarch.models.registry import build_model, config_to_dict, family_of_config
    from lmarch.nn.init import empty_weights

    if precision not in PRECISION_BYTES:
        raise LmarchError(
            f"unknown precision {precision!r}", hint=f"one of {', '.join(PRECISION_BYTES)}"
        )
    if batch < 1:
        raise LmarchError(f"--batch must be >= 1, got {batch}")
    image_text = _image_text_model(spec)
    if image_text is not None:
        return inspect_image_text(*image_text[:1], seq_len, precision, image_text[1])
    name, config, description = resolve_config(spec)
    with empty_weights():
        model = build_model(config)
    limit = int(getattr(model, "max_positions", 0) or config.block_size)
    t = seq_len or min(int(config.block_size), limit)
    if t < 1 or t > limit:
        raise LmarchError(
            f"--seq-len must be in 1..{limit} for {name}, got {t}", hint="the model's positions"
        )
    params = sum(p.numel() for p in model.parameters())
    emb = embedding_parameters(model)
    count = count_forward_flops(config, t, batch)
    measured = measure_flops(model, config, t, batch)
    layers, d_attn = attention_width(config)
    tokens = count.tokens
    return InspectReport(
        name=name,
        family=family_of_config(config).name,
        description=description,
        seq_len=t,
        batch=batch,
        precision=precision,
        params=params,
        embedding_params=emb,
        tree=module_tree(model),
        flop_parts={k: v / tokens for k, v in count.parts.items()},
        forward_flops_per_token=count.forward_per_token,
        training_flops_per_token=count.training_per_token,
        measured_forward_flops_per_token=measured / tokens,
        six_n_per_token=6.0 * (params - emb),
        attention_term_per_token=12.0 * layers * t * d_attn,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(config, precision),
        memory=training_memory(config, params, t, batch, precision),
        config=config_to_dict(config),
    )


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (K, M, G, T; bytes in binary units when ``unit`` is 'B')."""
    if unit == "B":
        for suffix, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(n) >= size:
                return f"{n / size:.2f} {suffix}"
        return f"{int(n)} B"
    for suffix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def tree_lines(tree: list[TreeRow]) -> list[str]:
    """The module tree as indented lines with each node's parameter count."""
    out = ["module tree (parameters first counted at each node)"]
    for row in tree:
        label = f"{'  ' * row.depth}{row.path.split('.')[-1]}: {row.kind}"
        note = f"  {row.note}" if row.note else ""
        out.append(f"  {label:<48} {row.params:>15,}{note}")
    return out


def render(report: InspectReport | ImageTextReport) -> str:
    """The report as plain text."""
    if isinstance(report, ImageTextReport):
        return render_image_text(report)
    r = report
    out = [
        f"{r.name} — {r.family}, {r.description}",
        f"parameters: {r.params:,} ({human(r.params)}); non-embedding {r.non_embedding_params:,}",
        "",
        *tree_lines(r.tree),
    ]
    m = r.memory
    rule = r.six_n_per_token + r.attention_term_per_token
    out += [
        "",
        f"FLOPs per token (seq_len {r.seq_len}, batch {r.batch})"
        + (", per target token" if r.family in ENCODER_DECODERS else ""),
        f"  forward            {human(r.forward_flops_per_token)}"
        f"   (FlopCounterMode: {human(r.measured_forward_flops_per_token)},"
        f" ratio {r.flop_agreement:.4f})",
        f"  training (3x)      {human(r.training_flops_per_token)}",
        f"  6N rule            {human(r.six_n_per_token)} (N without embeddings)"
        f" + attention 12 L T d_attn {human(r.attention_term_per_token)}"
        + (f" = {rule / r.training_flops_per_token:.0%} of training" if rule else ""),
        "  forward by component:",
    ]
    out += [f"    {k:<36} {human(v)}" for k, v in r.flop_parts.items()]
    out += [
        "",
        f"memory ({r.precision})",
        f"  KV cache per token {human(r.kv_cache_bytes_per_token, 'B')}"
        f"  ({human(r.kv_cache_bytes_per_token * r.seq_len * r.batch, 'B')} for"
        f" {r.batch} x {r.seq_len} tokens)",
        f"  weights            {human(m.weights, 'B')}",
        f"  gradients          {human(m.gradients, 'B')}",
        f"  AdamW moments      {human(m.optimizer, 'B')}",
        f"  fp32 master copy   {human(m.master_weights, 'B')}",
        f"  activations        {human(m.activations, 'B')}"
        f"  (checkpointed: {human(m.activations_checkpointed, 'B')})",
        f"  training total     {human(m.total, 'B')}"
        f"  (checkpointed: {human(m.total_checkpointed, 'B')})",
    ]
    return "\n".join(out)


__all__ = [
    "InspectReport",
    "TreeRow",
    "embedding_parameters",
    "human",
    "inspect_model",
    "module_tree",
    "render",
    "resolve_config",
    "tree_lines",
]
