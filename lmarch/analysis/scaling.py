"""Compute-optimal scaling (Hoffmann et al. 2022, "Training Compute-Optimal Large Language
Models" — Chinchilla), as a calculator and as a small experiment run on a CPU.

The paper fits the final loss of 400+ runs with (its eq. 2 and approach 3, sec. 3.3)

    L(N, D) = E + A / N^alpha + B / D^beta,   E = 1.69, A = 406.4, B = 410.7,
                                              alpha = 0.34, beta = 0.28

(N parameters, D training tokens, L in nats per token of MassiveText). A training run costs
C ~= 6 N D FLOPs (Kaplan et al. 2020), and minimising L under that constraint gives (eq. 4)

    N_opt(C) = G (C / 6)^a,  D_opt(C) = G^-1 (C / 6)^b,
    G = (alpha A / (beta B))^(1 / (alpha + beta)),  a = beta / (alpha + beta),  b = alpha / (alpha + beta)

— with the fitted constants a = 0.45, b = 0.55. The paper's other two approaches give a ~= b ~=
0.5, which the popular rule "about 20 tokens per parameter" (Chinchilla itself: 70B parameters,
1.4T tokens) states as D = 20 N, so N = sqrt(C / 120).

:func:`run_sweep` repeats the paper's approach 2 (IsoFLOP profiles) at toy scale: for each FLOP
budget, GPTs of several sizes are trained on the bundled Shakespeare for exactly that many FLOPs
(:mod:`lmarch.analysis.flops` counts a step), the loss against log N is fitted by a parabola
whose minimum is N_opt(C), and N_opt ∝ C^a is fitted across budgets; the parametric law above
is fitted to all runs as well (a grid over alpha, beta with least squares for E, A, B).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmarch.errors import LmarchError

# Hoffmann et al. 2022, sec. 3.3 / eq. (10): the fitted parametric loss
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TOKENS_PER_PARAM = 20.0  # the rule of thumb read from Chinchilla (70B params, 1.4T tokens)
PAPER_EXPONENTS = {"a (N_opt ~ C^a), approach 2": 0.49, "b (D_opt ~ C^b), approach 2": 0.51}


def chinchilla_loss(n_params: float, n_tokens: float, law: dict[str, float] = CHINCHILLA) -> float:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2)."""
    return law["E"] + law["A"] / n_params ** law["alpha"] + law["B"] / n_tokens ** law["beta"]


def compute_optimal(flops: float, law: dict[str, float] = CHINCHILLA) -> tuple[float, float]:
    """(N_opt, D_opt) minimising L(N, D) subject to 6 N D = ``flops`` (eq. 4)."""
    alpha, beta = law["alpha"], law["beta"]
    g = (alpha * law["A"] / (beta * law["B"])) ** (1.0 / (alpha + beta))
    a, b = beta / (alpha + beta), alpha / (alpha + beta)
    return g * (flops / 6.0) ** a, (flops / 6.0) ** b / g


@dataclass(frozen=True)
class ScalingPlan:
    """A FLOP budget's compute-optimal model by the fitted law and by the 20-tokens rule."""

    flops: float
    n_opt: float
    d_opt: float
    loss_opt: float
    n_rule: float
    d_rule: float
    loss_rule: float
    n_given: float | None = None  # a model size the user asked about, its tokens and loss
    d_given: float | None = None
    loss_given: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def plan(flops: float, n_params: float | None = None) -> ScalingPlan:
    """The Chinchilla calculator for a budget of ``flops`` training FLOPs (C = 6 N D); with
    ``n_params``, also the tokens that budget buys that model, D = C / (6 N), and its loss."""
    if not (flops > 0 and math.isfinite(flops)):
        raise LmarchError(f"the FLOP budget must be a positive number, got {flops}")
    if n_params is not None and not n_params > 0:
        raise LmarchError(f"--params must be positive, got {n_params}")
    n_opt, d_opt = compute_optimal(flops)
    n_rule = math.sqrt(flops / (6.0 * TOKENS_PER_PARAM))
    d_rule = TOKENS_PER_PARAM * n_rule
    given: dict[str, float] = {}
    if n_params is not None:
        d = flops / (6.0 * n_params)
        given = {"n_given": n_params, "d_given": d, "loss_given": chinchilla_loss(n_params, d)}
    return ScalingPlan(
        flops,
        n_opt,
        d_opt,
        chinchilla_loss(n_opt, d_opt),
        n_rule,
        d_rule,
        chinchilla_loss(n_rule, d_rule),
        **given,
    )


# ---- the sweep -------------------------------------------------------------------------------

# (layers, width, heads) of the GPTs a sweep chooses from, smallest first
SWEEP_SHAPES: tuple[tuple[int, int, int], ...] = (
    (1, 8, 2),
    (1, 16, 2),
    (1, 32, 2),
    (2, 32, 2),
    (2, 48, 4),
    (2, 64, 4),
    (3, 96, 4),
    (4, 128, 4),
    (4, 192, 6),
    (6, 256, 8),
)


@dataclass
class SweepConfig:
    """An IsoFLOP sweep: budgets (training FLOPs each run spends), the GPT shapes tried, the
    context and batch of every run, and the shortest run worth fitting (``min_steps``)."""

    data: str = "shakespeare"
    budgets: Sequence[float] = (3e10, 1e11, 3e11)
    shapes: Sequence[tuple[int, int, int]] = SWEEP_SHAPES
    block_size: int = 64
    batch_size: int = 16
    min_steps: int = 20
    max_steps: int = 20000
    learning_rate: float = 2e-3
    val_chars: int = 20000
    seed: int = 0
    # models this small spend a step mostly in per-op overhead: one thread runs them faster
    # than two contending ones (and leaves the machine's other cores alone)
    threads: int = 1

    def __post_init__(self) -> None:
        if len(self.budgets) < 2:
            raise LmarchError("a sweep needs at least two budgets", hint="--budgets 1e11,3e11")
        if any(not (b > 0 and math.isfinite(b)) for b in self.budgets):
            raise LmarchError(f"budgets must be positive FLOP counts, got {list(self.budgets)}")
        if self.threads < 1:
            raise LmarchError(f"--threads must be >= 1, got {self.threads}")
        if self.min_steps < 1 or self.block_size < 2 or self.batch_size < 1:
            raise LmarchError("--min-steps, --block-size and --batch-size must be >= 1 (2)")


@dataclass
class SweepRun:
    """One trained model: its budget, shape, parameters N, tokens D, steps and final loss."""

    budget: float
    shape: tuple[int, int, int]
    params: int
    tokens: int
    steps: int
    flops: float
    val_loss: float
    seconds: float


@dataclass
class SweepResult:
    """All runs, each budget's best, the fitted exponents and law, and the plot's path."""

    runs: list[SweepRun]
    optimum: dict[float, dict[str, float]]  # budget -> N_opt (parabola), best run's N, D, loss
    exponent_a: float  # N_opt ∝ C^a
    exponent_b: float  # D_opt ∝ C^b
    law: dict[str, float]  # fitted E, A, B, alpha, beta
    plot: str = ""
    note: str = ""
    paper: dict[str, float] = field(default_factory=lambda: {**CHINCHILLA, **PAPER_EXPONENTS})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (budgets as strings)."""
        return {
            "runs": [asdict(r) for r in self.runs],
            "optimum": {f"{b:.3g}": v for b, v in self.optimum.items()},
            "exponent_a": self.exponent_a,
            "exponent_b": self.exponent_b,
            "law": self.law,
            "paper": self.paper,
            "plot": self.plot,
            "note": self.note,
        }


WHY_DIFFERENT = (
    "A CPU-minute sweep is not Chinchilla: its models have thousands to a million parameters "
    "(the paper's start at 70M), it reads characters of one 1 MB corpus that the smallest "
    "models' runs read several times over, and each run is short and its learning rate untuned "
    "per size, so the fitted exponents carry those effects (and the noise of a few points) "
    "rather than the paper's asymptotic law."
)


def fit_parabola_minimum(log_n: np.ndarray, loss: np.ndarray, half_width: int = 2) -> float:
    """log N at the minimum of the least-squares parabola through the IsoFLOP valley (Hoffmann
    et al. 2022, approach 2): the best run and up to ``half_width`` runs either side of it in
    log N (far from the minimum a profile is no parabola); the best point itself when the
    valley has fewer than 3 runs or the fit has no minimum inside it."""
    order = np.argsort(log_n)
    x, y = np.asarray(log_n, float)[order], np.asarray(loss, float)[order]
    i = int(np.argmin(y))
    x, y = (
        x[max(0, i - half_width) : i + half_width + 1],
        y[max(0, i - half_width) : i + half_width + 1],
    )
    best = float(x[int(np.argmin(y))])
    if len(x) < 3:
        return best
    c2, c1, _ = np.polyfit(x, y, 2)
    if c2 <= 0:
        return best
    vertex = -c1 / (2 * c2)
    return float(vertex) if x.min() <= vertex <= x.max() else best


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(exponent, prefactor) of y = k x^e, by least squares on log y = e log x + log k."""
    e, log_k = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(e), float(math.exp(log_k))


def fit_loss_law(n: Sequence[float], d: Sequence[float], loss: Sequence[float]) -> dict[str, float]:
    """E, A, B, alpha, beta of L = E + A N^-alpha + B D^-beta fitted to runs: for each
    (alpha, beta) on a grid of step 0.01 in [0.02, 1.5], E, A, B >= 0 by linear least squares;
    the pair with the smallest squared error wins (the paper minimises a Huber loss of log L)."""
    n_arr, d_arr, y = (np.asarray(v, float) for v in (n, d, loss))
    grid = np.arange(0.02, 1.5001, 0.01)
    alpha, beta = (g.ravel() for g in np.meshgrid(grid, grid, indexing="ij"))
    design = np.stack(
        [np.ones((len(alpha), len(y))), n_arr[None, :] ** -alpha[:, None],
         d_arr[None, :] ** -beta[:, None]],
        axis=2,
    )  # fmt: skip
    coef = np.linalg.pinv(design) @ y  # least squares for every (alpha, beta) at once
    err = ((np.einsum("gmk,gk->gm", design, coef) - y) ** 2).sum(axis=1)
    err[(coef < 0).any(axis=1)] = np.inf  # E, A, B must be >= 0
    best = int(np.argmin(err))
    if not np.isfinite(err[best]):
        return {k: math.nan for k in CHINCHILLA}
    e, a, b = coef[best]
    return {"E": float(e), "A": float(a), "B": float(b), "alpha": float(alpha[best]),
            "beta": float(beta[best])}  # fmt: skip


def _train_one(
    cfg: SweepConfig, shape: tuple[int, int, int], steps: int, tokenizer: Any, train_ids: Any,
    val_ids: Any,
) -> tuple[int, float]:  # fmt: skip
    import torch

    from lmarch.models.gpt import GPTConfig
    from lmarch.models.registry import build_model
    from lmarch.settings import build_config
    from lmarch.train.config import TrainConfig
    from lmarch.train.evaluate import evaluate_tokens
    from lmarch.train.run import clm_batches, clm_loss
    from lmarch.train.trainer import Trainer

    n_layer, n_embd, n_head = shape
    model_cfg = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=cfg.block_size, n_layer=n_layer,
        n_head=n_head, n_embd=n_embd,
    )  # fmt: skip
    train_cfg = build_config(
        TrainConfig,
        {
            "batch_size": cfg.batch_size, "max_iters": steps, "lr_decay_iters": steps,
            "learning_rate": cfg.learning_rate, "min_lr": cfg.learning_rate / 10,
            "warmup_iters": min(100, steps // 10), "beta2": 0.99, "device": "cpu",
            "seed": cfg.seed, "eval_iters": 1, "log_interval": 10**9, "eval_interval": 10**9,
        },
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    batches = clm_batches(model_cfg, train_ids, val_ids, train_cfg)
    trainer = Trainer(model, *batches, train_cfg, loss_fn=clm_loss(model_cfg))
    for _ in range(steps):
        trainer.train_step()
    params = sum(p.numel() for p in model.parameters())
    loss = evaluate_tokens(model.eval(), val_ids, cfg.block_size)["loss"]
    return params, float(loss)


def run_sweep(
    cfg: SweepConfig, out: str | Path, log: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
) -> SweepResult:  # fmt: skip
    """Train every (budget, shape) whose run has at least ``min_steps`` steps, each for exactly
    its budget of training FLOPs, on ``cfg.threads`` threads; fit and plot (``out``/scaling.png
    and the runs as JSON)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _sweep(cfg, out, log, progress)
    finally:
        torch.set_num_threads(before)


def _sweep(
    cfg: SweepConfig, out: str | Path, log: Callable[[str], None],
    progress: Callable[[int, int], None] | None,
) -> SweepResult:  # fmt: skip
    import torch

    from lmarch.analysis.compare import read_splits
    from lmarch.analysis.flops import count_forward_flops
    from lmarch.models.gpt import GPTConfig
    from lmarch.tokenizers.kinds import build_tokenizer

    train, val = read_splits(cfg.data, cfg.val_chars)
    tokenizer = build_tokenizer("char", train, val, 0)
    train_ids = torch.tensor(tokenizer.encode(train), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val), dtype=torch.long)
    tokens_per_step = cfg.batch_size * cfg.block_size
    plans = []
    for budget in sorted(cfg.budgets):
        for shape in cfg.shapes:
            gpt = GPTConfig(
                vocab_size=tokenizer.vocab_size, block_size=cfg.block_size, n_layer=shape[0],
                n_embd=shape[1], n_head=shape[2],
            )  # fmt: skip
            per_step = count_forward_flops(gpt, cfg.block_size, cfg.batch_size).training
            steps = int(budget // per_step)
            if cfg.min_steps <= steps <= cfg.max_steps:
                plans.append((budget, shape, steps, per_step))
    per_budget = {b: sum(1 for p in plans if p[0] == b) for b in cfg.budgets}
    thin = [f"{b:.3g}" for b, k in per_budget.items() if k < 3]
    if thin:
        raise LmarchError(
            f"budget(s) {', '.join(thin)} leave fewer than 3 model sizes with "
            f"{cfg.min_steps}..{cfg.max_steps} steps",
            hint="raise the budgets, or lower --min-steps",
        )
    runs: list[SweepRun] = []
    for i, (budget, shape, steps, per_step) in enumerate(plans):
        tick = time.perf_counter()
        params, loss = _train_one(cfg, shape, steps, tokenizer, train_ids, val_ids)
        runs.append(
            SweepRun(
                budget,
                shape,
                params,
                steps * tokens_per_step,
                steps,
                steps * per_step,
                loss,
                time.perf_counter() - tick,
            )  # fmt: skip
        )
        log(f"C={budget:.3g}: {shape} N={params:,} D={steps * tokens_per_step:,} loss {loss:.4f}")
        if progress:
            progress(i + 1, len(plans))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LmarchError(f"cannot write to {out}: {exc.strerror}") from None
    result = fit_sweep(runs)
    result.plot = str(plot_sweep(result, out / "scaling.png"))
    return result


def fit_sweep(runs: Sequence[SweepRun]) -> SweepResult:
    """Each budget's valley (parabola minimum N_opt, D_opt = C / 6 N_opt, and its best run),
    N_opt ∝ C^a and D_opt ∝ C^b across budgets, and the law L(N, D) fitted to every run."""
    optimum: dict[float, dict[str, Any]] = {}
    for budget in sorted({r.budget for r in runs}):
        mine = [r for r in runs if r.budget == budget]
        log_n = np.log([r.params for r in mine])
        losses = np.array([r.val_loss for r in mine])
        n_opt = math.exp(fit_parabola_minimum(log_n, losses))
        best = min(mine, key=lambda r: r.val_loss)
        optimum[budget] = {
            "n_opt": n_opt,
            "d_opt": budget / (6.0 * n_opt),
            "best_params": best.params,
            "best_tokens": best.tokens,
            "best_loss": best.val_loss,
            "best_shape": list(best.shape),
        }
    budgets = sorted(optimum)
    a, _ = fit_power_law(budgets, [optimum[b]["n_opt"] for b in budgets])
    b_exp, _ = fit_power_law(budgets, [optimum[b]["d_opt"] for b in budgets])
    law = fit_loss_law(
        [r.params for r in runs], [r.tokens for r in runs], [r.val_loss for r in runs]
    )
    return SweepResult(list(runs), optimum, a, b_exp, law, note=WHY_DIFFERENT)


def load_sweep(path: str | Path) -> SweepResult:
    """The sweep saved as ``runs.json`` by ``lmarch scaling sweep``, refitted with
    :func:`fit_sweep` from its runs (the fit is cheap; the training is what took minutes)."""
    import json

    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        runs = [SweepRun(**{**r, "shape": tuple(r["shape"])}) for r in saved["runs"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LmarchError(
            f"cannot read the sweep {path}: {exc}",
            hint="the runs.json that `lmarch scaling sweep --out DIR` writes",
        ) from None
    return fit_sweep(runs)


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """Left: IsoFLOP curves (loss against N, one per budget, its best run ringed). Right:
    N_opt against C with the fitted power law and Chinchilla's eq. 4 for comparison."""
    from lmarch.analysis.plots import plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.3), dpi=120)
    budgets = sorted(result.optimum)
    for budget in budgets:
        mine = sorted((r for r in result.runs if r.budget == budget), key=lambda r: r.params)
        line = left.plot([r.params for r in mine], [r.val_loss for r in mine], "o-",
                         label=f"C = {budget:.2g}")  # fmt: skip
        best = result.optimum[budget]
        left.plot([best["best_params"]], [best["best_loss"]], "o", markersize=12,
                  markerfacecolor="none", color=line[0].get_color())  # fmt: skip
    left.set_xscale("log")
    left.set_xlabel("parameters N")
    left.set_ylabel("validation loss (nats/char)")
    left.set_title("IsoFLOP profiles")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    n_opt = [result.optimum[b]["n_opt"] for b in budgets]
    right.plot(budgets, n_opt, "o", label="N_opt (parabola minimum)")
    xs = np.geomspace(budgets[0], budgets[-1], 50)
    a, k = fit_power_law(budgets, n_opt)
    right.plot(xs, k * xs**a, "-", label=f"fit: N_opt ∝ C^{a:.2f}")
    right.plot(xs, [compute_optimal(x)[0] for x in xs], "--", label="Chinchilla eq. 4: C^0.45")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("training FLOPs C")
    right.set_ylabel("N_opt")
    right.set_title("compute-optimal model size")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = [
    "CHINCHILLA",
    "TOKENS_PER_PARAM",
    "WHY_DIFFERENT",
    "ScalingPlan",
    "SweepConfig",
    "SweepResult",
    "SweepRun",
    "chinchilla_loss",
    "compute_optimal",
    "fit_loss_law",
    "fit_parabola_minimum",
    "fit_power_law",
    "fit_sweep",
    "load_sweep",
    "plan",
    "plot_sweep",
    "run_sweep",
]
