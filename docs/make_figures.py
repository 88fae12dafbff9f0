"""Make the figures of docs/ and the measured model table of 03-llms.md with lmarch itself.

The figures: those of docs/theory/; docs/inspect.md's attention maps, logit lens and
word-vector plot (its ``lmarch attention``, ``lmarch logit-lens`` and ``lmarch vectors-plot``
examples, on SmolLM2, MiniLM and gensim's test vectors); and docs/scaling.md's IsoFLOP plot,
drawn from the saved runs of the default ``lmarch scaling sweep`` (figures/scaling_sweep.json).

    .venv/bin/python docs/make_figures.py          # or: make docs
    .venv/bin/python docs/make_figures.py --sweep  # train the sweep again first (~9 minutes)

Each figure calls the lmarch function that the page's equation points to (the schedules of
lmarch/train/optim.py, the positions of lmarch/nn/position.py, the quantisers of lmarch/quant/,
a tiny GPT of lmarch/models/gpt.py trained here for a few seconds), so a change in the code
shows in the figure. Seeded and single-threaded: the same code gives the same pictures.
Under a minute on two cores; ``--table-only`` rewrites only the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
FIGURES = DOCS / "figures"
THEORY = DOCS / "theory"
TABLE_FILE = THEORY / "03-llms.md"
TABLE_BEGIN, TABLE_END = "<!-- table:begin -->", "<!-- table:end -->"
PNG_META = {"Software": None}  # no version string in the file: the bytes depend on the picture

# The pretrained-scale rows: one representative preset per family, in the order the pages tell.
# Kind and tasks are what lmarch does with each (its commands); parameters are counted.
PRESET_ROWS = [
    ("transformer-base", "encoder-decoder (Vaswani et al. 2017)", "translate, summarize"),
    ("bert-base", "encoder, masked LM (Devlin et al. 2018)", "embed, classify, answer, search"),
    ("roberta-base", "encoder, masked LM, no NSP (Liu et al. 2019)", "embed, classify, answer"),
    ("albert-base-v2", "encoder, shared layers (Lan et al. 2019)", "classify, answer"),
    ("electra-small", "encoder, replaced-token detection (Clark et al. 2020)", "classify, answer"),
    ("minilm-l6", "encoder, distilled (Wang et al. 2020)", "embed, search, classify, answer"),
    ("gpt2", "decoder, causal LM (Radford et al. 2019)", "generate, finetune, export"),
    ("t5-small", "encoder-decoder, span corruption (Raffel et al. 2019)", "translate, summarize"),
    ("bart-base", "encoder-decoder, denoising (Lewis et al. 2019)", "translate, summarize"),
    ("llama2-7b", "decoder, RMSNorm + RoPE + SwiGLU (Touvron et al. 2023)", "inspect (shape only)"),
    ("llama3-8b", "decoder, grouped-query attention (2024)", "inspect (shape only)"),
    ("smollm2-135m", "decoder, LLaMA shape, real weights (2024)", "chat, generate, finetune"),
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "svg.hashsalt": "lmarch"})
    return plt


def _save(fig, name: str) -> Path:
    path = FIGURES / name
    fig.savefig(path, metadata=PNG_META)
    _plt().close(fig)
    return path


def analysis_table() -> str:
    """The model table: the measured rows of ``lmarch compare`` (docs/compare/rows.json) and
    the parameter counts of the preset registry, counted on the meta device."""
    from lmarch.models.registry import count_parameters, get_preset

    rows = json.loads((DOCS / "compare" / "rows.json").read_text(encoding="utf-8"))["rows"]
    out = [
        "| model | type | parameters | tasks in lmarch | measured (lmarch compare, 120 s, 2 CPUs) |",
        "|---|---|---:|---|---|",
    ]
    for r in rows:
        unit = " n-grams" if r["model"] == "ngram" else ""
        out.append(
            f"| {r['model']} (char) | {r['kind']} | {r['params']:,}{unit} | train, sample, eval "
            f"| val {r['val_loss']:.3f} nats/char, {r['tokens_per_s']:,.0f} tokens/s |"
        )
    for name, kind, tasks in PRESET_ROWS:
        n = count_parameters(get_preset(name).config)
        out.append(f"| {name} | {kind} | {n / 1e6:,.1f}M | {tasks} | |")
    return "\n".join(out) + "\n"


def write_table(path: Path = TABLE_FILE) -> None:
    """Put :func:`analysis_table` between the table markers of ``path``."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(TABLE_BEGIN) + r".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no {TABLE_BEGIN} ... {TABLE_END} markers")
    block = f"{TABLE_BEGIN}\n{analysis_table()}{TABLE_END}"
    path.write_text(pattern.sub(lambda _: block, text), encoding="utf-8")


def table_in_file(path: Path = TABLE_FILE) -> str:
    """The text between the table markers of ``path``, without the markers."""
    text = path.read_text(encoding="utf-8")
    start = text.index(TABLE_BEGIN) + len(TABLE_BEGIN) + 1
    return text[start : text.index(TABLE_END)]


def fig_attention() -> Path:
    """Causal attention of a 4-layer character GPT trained here for 150 steps (~3 s)."""
    from lmarch.analysis.attention_maps import capture_attention
    from lmarch.data.corpus import TINY_SHAKESPEARE
    from lmarch.models import GPT, preset_config
    from lmarch.tokenizers.char import CharTokenizer

    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    data = torch.tensor(tok.encode(text[:200_000]))
    torch.manual_seed(0)
    model = GPT(preset_config("gpt-char-tiny", vocab_size=tok.vocab_size, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 65, (16,), generator=gen)
        batch = torch.stack([data[s : s + 65] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    sample = "ROMEO:\nBut soft! what light through"
    ids = torch.tensor([tok.encode(sample)])
    with capture_attention(model) as records, torch.no_grad():
        model(ids)
    plt = _plt()
    layer = 1
    probs = records[layer].probs[0]  # [H, T, T]
    fig, axes = plt.subplots(1, probs.shape[0], figsize=(12, 3.4))
    labels = [c if c != "\n" else "\\n" for c in sample]
    for h, ax in enumerate(axes):
        ax.imshow(probs[h].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer}, head {h}")
        ax.set_xticks(range(len(labels)), labels, fontsize=5, family="monospace")
        ax.set_yticks(range(len(labels)), labels, fontsize=5, family="monospace")
    fig.suptitle(
        f"softmax(QK^T/sqrt(d) + causal mask) of gpt-char-tiny after 150 steps "
        f"(train loss {loss.item():.2f}); rows: queries, columns: keys"
    )
    fig.tight_layout()
    return _save(fig, "attention_causal.png")


def fig_positions() -> Path:
    """The sinusoid table, and how RoPE's q.k score depends only on the distance."""
    from lmarch.nn.position import apply_rotary, rope_inverse_frequencies, sinusoidal_table

    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    table = sinusoidal_table(128, 64)
    im = a.imshow(table.T.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    a.set_xlabel("position pos")
    a.set_ylabel("dimension (even: sin, odd: cos)")
    a.set_title("sinusoidal positions: sin/cos(pos / 10000^(2i/d)), d = 64")
    fig.colorbar(im, ax=a)
    dist = torch.arange(0, 512)
    for theta in (1e4, 5e5):
        inv = rope_inverse_frequencies(64, theta)
        angles = dist[:, None].double() * inv[None, :].double()
        cos = torch.cat([angles.cos(), angles.cos()], -1).float()
        sin = torch.cat([angles.sin(), angles.sin()], -1).float()
        q = torch.ones(1, 64)
        k = apply_rotary(torch.ones(len(dist), 64), cos, sin)  # key m positions away
        b.plot(dist.numpy(), (k @ q.T)[:, 0].numpy() / 64, label=f"theta = {theta:g}")
    b.set_xlabel("distance m - n")
    b.set_ylabel("q . R(m-n) k / d  (q = k = 1)")
    b.set_title("RoPE: the score depends on m - n only, and decays")
    b.legend()
    fig.tight_layout()
    return _save(fig, "positions.png")


def fig_schedules() -> Path:
    """Warmup + cosine (lmarch's default) and the Transformer paper's inverse square root."""
    from lmarch.train.config import TrainConfig
    from lmarch.train.optim import learning_rate_at, transformer_lr

    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    cfg = TrainConfig(max_iters=2000, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100)
    steps = range(2000)
    a.plot(steps, [learning_rate_at(s, cfg) for s in steps])
    a.set_title("warmup 100 + cosine to min_lr (learning_rate_at)")
    a.set_xlabel("step")
    a.set_ylabel("learning rate")
    steps = range(0, 100_000, 50)
    for d, w in ((512, 4000), (512, 8000), (1024, 4000)):
        b.plot(steps, [transformer_lr(s, d, w) for s in steps], label=f"d_model {d}, warmup {w}")
    b.set_title("Vaswani et al. eq. 3: d^-0.5 min(n^-0.5, n w^-1.5) (transformer_lr)")
    b.set_xlabel("step")
    b.legend()
    fig.tight_layout()
    return _save(fig, "lr_schedules.png")


def memory_per_strategy(config: object, world: int, lora_rank: int = 16) -> dict[str, float]:
    """Bytes per GPU for parameters + gradients + Adam state with bf16 weights and an fp32
    master copy and moments (2 + 2 + 12 bytes per parameter, Rajbhandari et al. 2020), by
    strategy; and QLoRA on one GPU: every Linear in NF4 (4 bits, plus an 8-bit absmax per 64
    and an fp32 constant per 256 absmaxes), the rest bf16, rank-``lora_rank`` adapters on each
    Linear trained with 16 bytes per parameter."""
    from torch import nn

    from lmarch.models.registry import build_model
    from lmarch.nn.init import empty_weights

    with empty_weights():
        model = build_model(config)
    params = list(dict.fromkeys(model.parameters()))
    n = sum(p.numel() for p in params)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    in_linear = sum(m.weight.numel() for m in linears)
    adapters = sum(lora_rank * (m.in_features + m.out_features) for m in linears)
    nf4 = in_linear * (0.5 + 1 / 64 + 4 / (64 * 256))
    return {
        "DDP (replicated)": 16 * n,
        "ZeRO-1 (optimizer sharded)": 4 * n + 12 * n / world,
        "ZeRO-2 (+ gradients)": 2 * n + 14 * n / world,
        "ZeRO-3 / FSDP (+ parameters)": 16 * n / world,
        f"QLoRA r={lora_rank}, one GPU": nf4 + 2 * (n - in_linear) + 16 * adapters,
    }


def fig_memory() -> Path:
    """Training-state memory per GPU of the shape-only 8B preset, 8 GPUs, by strategy."""
    from lmarch.models.registry import count_parameters, get_preset

    config = get_preset("llama3-8b").config
    n = count_parameters(config)
    per = memory_per_strategy(config, 8)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    names = list(per)
    gib = [per[k] / 2**30 for k in names]
    ax.barh(names[::-1], gib[::-1], color="tab:blue")
    for y, v in enumerate(gib[::-1]):
        ax.text(v, y, f" {v:,.1f} GiB", va="center")
    ax.axvline(80, color="tab:red", linestyle="--")
    ax.text(80, len(names) - 0.6, " 80 GiB GPU", color="tab:red")
    ax.set_xlabel("GiB per GPU (weights + gradients + Adam state; activations not counted)")
    ax.set_title(f"llama3-8b ({n / 1e9:.2f}B parameters) on 8 GPUs")
    ax.set_xlim(0, max(gib) * 1.25)
    fig.tight_layout()
    return _save(fig, "memory_strategies.png")


def quant_errors(weight: torch.Tensor) -> dict[str, float]:
    """Relative RMS error ||W - W~|| / ||W|| of each weight-only format in lmarch/quant."""
    from lmarch.quant.int4 import dequantize_int4, quantize_int4
    from lmarch.quant.int8 import dequantize_int8, quantize_int8
    from lmarch.quant.nf4 import dequantize_nf4, quantize_nf4
    from lmarch.quant.q4_0 import quantize_q4_0

    def rel(approx: torch.Tensor) -> float:
        return float((weight - approx).norm() / weight.norm())

    q4, d4 = quantize_q4_0(weight)
    n, k = weight.shape
    q4_0 = ((q4.float() - 8).reshape(n, k // 32, 32) * d4[..., None]).reshape(n, k)
    # labels carry the storage cost: code bits + the scales' bits shared by a row/group/block
    return {
        "int8, per row (8.02 bits)": rel(dequantize_int8(*quantize_int8(weight))),
        "int4, groups of 32 (5 bits)": rel(dequantize_int4(*quantize_int4(weight, 32), 32)),
        "Q4_0, blocks of 32 (4.5 bits)": rel(q4_0),
        "NF4, blocks of 32 (4.25 bits)": rel(
            dequantize_nf4(quantize_nf4(weight, 32), torch.float32)
        ),
        "NF4, blocks of 64 (4.13 bits)": rel(
            dequantize_nf4(quantize_nf4(weight, 64), torch.float32)
        ),
    }


def fig_quant() -> Path:
    """NF4's 16 levels against a normal weight, and the error of each 8- and 4-bit format."""
    from lmarch.quant.nf4 import normal_float_code

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 1024, generator=gen) * 0.02
    errors = quant_errors(weight)
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    x = torch.linspace(-1, 1, 400)
    sigma = 1 / 2.5  # a block's absmax sits near 2.5 sigma for 64 normal values
    a.plot(x.numpy(), torch.exp(-0.5 * (x / sigma) ** 2).numpy(), color="gray")
    for c in normal_float_code().tolist():
        a.axvline(c, color="tab:blue", linewidth=0.8)
    a.set_title("NF4: 16 quantiles of N(0, 1), scaled to [-1, 1]")
    a.set_xlabel("w / absmax(block)")
    names = list(errors)
    b.barh(names[::-1], [errors[k] for k in names][::-1], color="tab:orange")
    for y, k in enumerate(names[::-1]):
        b.text(errors[k], y, f" {errors[k]:.4f}", va="center")
    b.set_xlim(0, max(errors.values()) * 1.3)
    b.set_title("||W - W~|| / ||W||, W ~ N(0, 0.02^2), 512 x 1024")
    fig.tight_layout()
    return _save(fig, "quant_error.png")


# docs/inspect.md's figure: `lmarch vectors-plot FILE --words one,two,...,mango` on this file of
# gensim's, with the numbers, animals and fruit of tests/cli/test_inspect_cli.py
VECTORS_FILE = "EN.1-10.cbow1_wind5_hs0_neg10_size300_smpl1e-05.txt"
VECTORS_WORDS = (
    "one,two,three,four,five,six,seven,eight,nine,ten,"
    "dog,pig,cat,fish,birds,apple,orange,grape,banana,mango"
)


def fig_vectors() -> Path:
    """Word vectors of numbers, animals and fruit on their first two principal components."""
    from lmarch.analysis.projection import load_word_vectors, plot_projection, project_words
    from lmarch.classic.vectors import gensim_test_file

    # what `lmarch vectors-plot FILE --words ... --out FILE.png` runs (lmarch/cli/inspect.py);
    # gensim (a dev dependency, --no-deps) carries the vectors: absent, the call says how to
    # install it
    vectors = load_word_vectors(gensim_test_file(VECTORS_FILE))
    found, coords, ratio = project_words(vectors, VECTORS_WORDS.split(","))
    with _as_the_cli():
        return plot_projection(found, coords, ratio, FIGURES / "vectors_pca.png")


# docs/inspect.md's figures: its `lmarch attention` and `lmarch logit-lens` commands, on the
# real SmolLM2 and MiniLM weights (downloaded once into the lmarch cache)
ATTENTION_RUNS = (  # model, text, layer, head (None: the grid of all heads), figure
    ("smollm2-135m", "The capital of France is", 3, None, "attention_smollm2_layer3.png"),
    ("minilm-l6", "The cat sat on the mat because it was tired", 4, 0, "attention_minilm_l4h0.png"),
)
LENS_RUN = ("smollm2-135m", "The capital of France is", "logit_lens_smollm2.png")
# docs/scaling.md's figure: the runs of `lmarch scaling sweep --data shakespeare` with its
# default budgets (~9 minutes), saved once; `--sweep` trains them again
SWEEP_RUNS = FIGURES / "scaling_sweep.json"


def _as_the_cli():
    """matplotlib's own defaults, as a fresh ``lmarch`` process plots with (not _plt's)."""
    return _plt().style.context("default")


def _load_float(spec: str):
    from lmarch.loading import load

    return load(spec, quant="none")  # what lmarch/cli/inspect.py loads: float weights


def fig_attention_pretrained() -> Path:
    """`lmarch attention` on SmolLM2 (layer 3, all heads) and MiniLM (layer 4, head 0)."""
    from lmarch.analysis.attention_maps import attention_maps, plot_attention

    path = FIGURES
    for model, text, layer, head, name in ATTENTION_RUNS:
        maps = attention_maps(_load_float(model), text)
        with _as_the_cli():
            path = plot_attention(maps, layer, head, FIGURES / name)
    return path


def fig_logit_lens() -> Path:
    """`lmarch logit-lens smollm2-135m "The capital of France is"`."""
    from lmarch.analysis.lens import logit_lens, plot_lens

    model, text, name = LENS_RUN
    result = logit_lens(_load_float(model), text, k=3)  # the command's --top default
    with _as_the_cli():
        return plot_lens(result, FIGURES / name)


def run_scaling_sweep() -> Path:
    """Train the default sweep again (~9 minutes on two busy cores) and save its runs."""
    import tempfile

    from lmarch.analysis.scaling import SweepConfig, run_sweep
    from lmarch.weights.checkpoint import write_json

    with tempfile.TemporaryDirectory() as tmp:
        result = run_sweep(SweepConfig(data="shakespeare"), tmp)
    result.plot = str((FIGURES / "scaling_sweep.png").relative_to(REPO))
    write_json(SWEEP_RUNS, result.as_dict())
    return SWEEP_RUNS


def fig_scaling_sweep() -> Path:
    """The IsoFLOP figure of the saved default sweep (scaling_sweep.json), refitted."""
    from lmarch.analysis.scaling import load_sweep, plot_sweep

    with _as_the_cli():
        return plot_sweep(load_sweep(SWEEP_RUNS), FIGURES / "scaling_sweep.png")


FIGURES_MADE = {
    "attention_causal.png": fig_attention,
    "positions.png": fig_positions,
    "lr_schedules.png": fig_schedules,
    "memory_strategies.png": fig_memory,
    "quant_error.png": fig_quant,
    "vectors_pca.png": fig_vectors,
    "attention_smollm2_layer3.png": fig_attention_pretrained,  # also attention_minilm_l4h0.png
    "attention_minilm_l4h0.png": fig_attention_pretrained,
    "logit_lens_smollm2.png": fig_logit_lens,
    "scaling_sweep.png": fig_scaling_sweep,
}


def main(argv: list[str] | None = None) -> int:
    """Write the figures and the table; ``--table-only`` for the table alone."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument(
        "--sweep", action="store_true", help="train the scaling sweep again first (~9 min)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # deterministic and fair on a shared machine
    write_table()
    print(f"table -> {TABLE_FILE.relative_to(REPO)}")
    if not args.table_only:
        FIGURES.mkdir(exist_ok=True)
        if args.sweep:
            print(f"{run_scaling_sweep.__doc__.splitlines()[0]} -> {run_scaling_sweep()}")
        for make in dict.fromkeys(FIGURES_MADE.values()):  # a function may make two figures
            print(f"{make.__doc__.splitlines()[0]} -> {make().relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
