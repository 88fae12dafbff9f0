"""Distributed strategies applied to a built model from outside, as torchtitan's ``parallelize``.

The model files never change: :func:`parallelize` takes the module the registry built and
returns what to train.

- ``single``: the model as it is.
- ``ddp`` (data parallel; Li et al. 2020, "PyTorch Distributed"): every rank holds the whole
  model, runs its slice of the batch, and the gradients are averaged over ranks (all-reduce in
  buckets, overlapped with the backward) before each optimizer step, so the ranks stay equal.
- ``fsdp`` (fully sharded data parallel, FSDP2 ``fully_shard``; ZeRO-3 of Rajbhandari et al.
  2020): parameters, gradients and optimizer moments are sharded over the ranks (dim 0 of every
  tensor, as DTensors). Each Transformer block is its own unit -- its parameters are all-gathered
  just before its forward/backward and freed after, gradients reduce-scattered -- and the root
  holds what is left (embeddings, final norm, head). Per rank that is ~1/N of the parameter,
  gradient and optimizer bytes of the unsharded model. ``precision=bf16`` becomes FSDP's
  mixed-precision policy (bf16 parameters in compute, fp32 gradient reduction, fp32 master
  weights) instead of autocast.
- ``tp`` (tensor parallel, Megatron-LM; :func:`tensor_parallel`): each attention's heads and each
  MLP's hidden units split over the ranks, column- then row-parallel, one all-reduce per pair;
  its checkpoints are gathered into the single-process layout (:func:`tp_checkpoint_tensors`).

Native fast paths (:func:`lmarch.native.accelerate`) are not swapped in under a distributed
strategy: the fused blocks take plain tensors (not FSDP's or TP's DTensor parameters) and were
not checked under DDP's hooks, so a distributed run trains the reference ``nn`` blocks.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.nn.attention import MultiHeadAttention
from lmarch.nn.block import TransformerBlock
from lmarch.nn.cross_attention import CrossAttentionBlock
from lmarch.nn.ffn import MLP, GatedMLP

__all__ = [
    "STRATEGIES",
    "ShardBytes",
    "check_strategy",
    "describe_memory",
    "gradient_sync",
    "is_dtensor",
    "parallelize",
    "reduce_partial_grads",
    "shard_bytes",
    "tensor_parallel",
    "tp_checkpoint_tensors",
    "tp_full_state_dict",
    "tp_load_checkpoint_tensors",
    "tp_optimizer",
    "unsharded_training_bytes",
]

STRATEGIES = ("single", "ddp", "fsdp", "tp")


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (FSDP's and TP's sharded tensors). ``torch.distributed.tensor``
    is not imported for the question: it takes about half a second, which every command that
    builds the CLI's parser would pay; until something imports it, nothing can be a DTensor."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


SHARDED_BLOCKS: tuple[type, ...] = (TransformerBlock, CrossAttentionBlock)


def _outer_blocks(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks of ``model`` that are not inside another block (FSDP units)."""
    blocks: list[nn.Module] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, SHARDED_BLOCKS) and id(module) not in seen:
            blocks.append(module)
            seen.update(id(m) for m in module.modules())
    return blocks


def parallelize(
    model: nn.Module, strategy: str, device: torch.device, precision: str = "fp32"
) -> tuple[nn.Module, nn.Module]:
    """Apply ``strategy`` to ``model`` (already on ``device``, the process group already up).

    Returns ``(model, forward_model)``: the module that holds the weights (its ``state_dict``
    names are the model's own) and the module to call in training (the DDP wrapper, which
    averages gradients; the sharded model itself for FSDP). Every rank must have built the same
    initial weights (the same seed) before this call.
    """
    if strategy == "single":
        return model, model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return model, DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        elif precision == "fp16":
            policy = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
        blocks = _outer_blocks(model)
        for i, block in enumerate(blocks):
            # the last block's parameters are needed at once by the backward: keep them gathered
            fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
        fully_shard(model, mp_policy=policy)
        return model, model
    if strategy == "tp":
        tensor_parallel(model, device)
        return model, model
    check_strategy(strategy)
    raise AssertionError(f"strategy {strategy!r} passed its check but has no plan")


def check_strategy(strategy: str, model: nn.Module | None = None, world_size: int = 1) -> None:
    """Refuse a strategy this build cannot apply -- before any rank waits for another, so every
    rank refuses alike and nothing hangs: ``tp`` checks that ``model`` splits over
    ``world_size`` ranks."""
    if strategy == "tp" and model is not None:
        check_tensor_parallel(model, world_size)
    if strategy not in STRATEGIES:
        raise LmarchError(f"unknown strategy {strategy!r}", hint=f"one of {', '.join(STRATEGIES)}")


@contextlib.contextmanager
def gradient_sync(forward_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within it, the backward of ``forward_model`` averages gradients over ranks only when
    ``enabled``: gradient accumulation syncs on its last micro-batch alone (DDP's ``no_sync``;
    FSDP2's ``set_requires_gradient_sync``). A plain module ignores it."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(forward_model, DistributedDataParallel) and not enabled:
        with forward_model.no_sync():
            yield
    elif isinstance(forward_model, FSDPModule):
        forward_model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            forward_model.set_requires_gradient_sync(True)
    else:
        yield


@dataclass
class ShardBytes:
    """Bytes this rank holds for training: parameters, gradients, optimizer state."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        """Parameters + gradients + optimizer state."""
        return self.params + self.grads + self.optimizer


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if is_dtensor(t) else t
    return local.numel() * local.element_size()


def shard_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> ShardBytes:
    """What this rank holds, counted from the local shards of DTensors (FSDP) or the whole
    tensors (single, DDP): parameters, the gradients present now, and the optimizer's tensors
    (AdamW: two moments per parameter; its step counters are scalars)."""
    params = list(dict.fromkeys(model.parameters()))
    p_bytes = sum(_local_bytes(p) for p in params)
    g_bytes = sum(_local_bytes(p.grad) for p in params if p.grad is not None)
    o_bytes = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            # AdamW's step counters are 0-d tensors (one per parameter): counted as scalars
            moments = [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
            o_bytes += sum(_local_bytes(v) for v in moments)
    return ShardBytes(p_bytes, g_bytes, o_bytes)


def unsharded_training_bytes(model: nn.Module) -> int:
    """Parameter + gradient + AdamW (two moments) bytes of the whole model in one process:
    4 x the parameter bytes (each tensor counted once, tied weights included)."""
    params = list(dict.fromkeys(model.parameters()))
    full = 0
    for p in params:
        numel = p.numel()  # a DTensor's numel is its global size
        full += numel * p.element_size()
    return 4 * full


def describe_memory(model: nn.Module, strategy: str, world_size: int) -> str:
    """One line on the training bytes this rank holds: its parameters (local shards under
    FSDP), as many gradient bytes, and AdamW's two fp32 moments, against one unsharded process."""
    mine = 4 * shard_bytes(model).params
    full = unsharded_training_bytes(model)
    return (
        f"{strategy} on {world_size} ranks: parameters + gradients + AdamW state "
        f"{mine / 2**20:.2f} MiB per rank ({mine / full:.0%} of {full / 2**20:.2f} MiB unsharded)"
    )


# ---- tensor parallel (Megatron-LM, Shoeybi et al. 2019) ------------------------------------------

TP_FAMILIES = ("GPT", "Llama")


def _row_order(sizes: list[int], world: int) -> Tensor:
    """Row permutation of a fused projection whose rows are the segments ``sizes`` (q, k, v or
    gate, up): afterwards rank r's contiguous 1/world of the rows is [q_r, k_r, v_r], the r-th
    slice of each segment -- what column-parallel sharding hands to rank r."""
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0).tolist()
    order = []
    for r in range(world):
        for start, size in zip(starts, sizes):
            part = size // world
            order.extend(range(start + r * part, start + (r + 1) * part))
    return torch.tensor(order)


def _group_rows(linear: nn.Linear, sizes: list[int], world: int) -> None:
    order = _row_order(sizes, world)
    with torch.no_grad():
        linear.weight.copy_(linear.weight[order])
        if linear.bias is not None:
            linear.bias.copy_(linear.bias[order])
    linear._tp_rows = (sizes, world)  # how tp_full_state_dict undoes it


def check_tensor_parallel(model: nn.Module, world: int) -> None:
    """Refuse, in one line, a model tensor parallelism cannot split over ``world`` ranks."""
    if type(model).__name__ not in TP_FAMILIES:
        raise LmarchError(
            f"--strategy tp splits GPT and LLaMA models, not {type(model).__name__}",
            hint="use --strategy ddp or fsdp",
        )
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            heads, kv = module.n_heads, module.n_kv_heads
            if heads % world or kv % world:
                raise LmarchError(
                    f"--strategy tp on {world} ranks needs the attention heads ({heads} query, "
                    f"{kv} key/value) divisible by {world}",
                    hint=f"run on a number of ranks that divides {kv}, or use ddp / fsdp",
                )
        hidden = module.hidden if isinstance(module, GatedMLP) else None
        if isinstance(module, MLP):
            hidden = module.fc_in.out_features
        if hidden is not None and hidden % world:
            raise LmarchError(
                f"--strategy tp on {world} ranks needs the MLP width {hidden} divisible by {world}"
            )


def tensor_parallel(
    model: nn.Module, device: torch.device, sequence_parallel: bool = True
) -> nn.Module:
    """Split every attention and MLP of ``model`` over the ranks of the process group, in place.

    Megatron's plan: the first matrix of each pair is column-parallel (each rank computes its
    heads / its slice of the hidden units from the whole input), the second row-parallel (each
    rank multiplies its slice, one all-reduce sums them), so a block costs two all-reduces and
    nothing is gathered in between. The fused q/k/v (and gate/up) rows are regrouped first so that
    rank r's contiguous share holds its own heads of q, k and v; the attention then runs its
    local heads (``n_heads / N``). Embeddings and the head stay whole on every rank.

    With ``sequence_parallel`` (Korthikanti et al. 2022, "Reducing Activation Recomputation in
    Large Transformer Models") the residual stream between the pairs is split along the
    sequence instead of held whole: each norm works on its rank's 1/N of the positions, the
    column-parallel input all-gathers the sequence and the row-parallel output reduce-scatters
    it (the same bytes on the wire as the all-reduce, which is a reduce-scatter plus an
    all-gather), so norm and residual activations cost 1/N per rank. The first block takes its
    rank's slice of the embeddings; the final norm's output is gathered whole for the head.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    world = dist.get_world_size()
    check_tensor_parallel(model, world)
    mesh = init_device_mesh(device.type, (world,))
    stream = Shard(1) if sequence_parallel else Replicate()  # the residual stream's layout

    def pair(first: str, second: str) -> dict:
        return {
            first: ColwiseParallel(input_layouts=stream),
            second: RowwiseParallel(output_layouts=stream, use_local_output=not sequence_parallel),
        }

    for module in list(model.modules()):
        if isinstance(module, MultiHeadAttention):
            hd = module.head_dim
            sizes = [module.n_heads * hd, module.n_kv_heads * hd, module.n_kv_heads * hd]
            _group_rows(module.qkv, sizes, world)
            parallelize_module(module, mesh, pair("qkv", "out"))
            module.n_heads //= world
            module.n_kv_heads //= world
        elif isinstance(module, GatedMLP):
            _group_rows(module.gate_up, [module.hidden, module.hidden], world)
            parallelize_module(module, mesh, pair("gate_up", "down"))
            module.hidden //= world
        elif isinstance(module, MLP):
            parallelize_module(module, mesh, pair("fc_in", "fc_out"))
    if sequence_parallel:
        _split_sequence(model, mesh, SequenceParallel, PrepareModuleInput, Replicate(), Shard(1))
    _local_cache(model)
    return model


def _split_sequence(model, mesh, sequence_style, prepare_input, whole, split) -> None:
    """Sequence parallelism around the tensor-parallel pairs: every block's norms work on their
    rank's slice of the positions, the first block slices its input, and the final norm's output
    is gathered whole again (the head and ``last_only`` slicing see a plain tensor)."""
    from torch.distributed.tensor.parallel import parallelize_module

    blocks = _outer_blocks(model)
    for block in blocks:
        names = ("norm_attn", "norm_ffn", "post_norm_attn", "post_norm_ffn")
        norms = [n for n in names if getattr(block, n, None) is not None]
        parallelize_module(block, mesh, {n: sequence_style() for n in norms})
    parallelize_module(
        blocks[0], mesh, prepare_input(input_layouts=(whole,), desired_input_layouts=(split,))
    )
    parallelize_module(model.norm_f, mesh, sequence_style())
    model.norm_f.register_forward_hook(
        lambda module, inputs, out: out.full_tensor() if is_dtensor(out) else out
    )


def _local_cache(model: nn.Module) -> None:
    """Give the split model a ``make_cache`` for its local key/value heads (the model's own sizes
    its cache from the config's head count), so greedy and sampled decoding run on it."""
    from lmarch.nn.cache import KVCache

    attns = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    whole = next(p for p in model.parameters() if not is_dtensor(p))

    def make_cache(
        batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        length = max_len or model.max_positions
        first = attns[0]
        return KVCache.like(
            whole, len(attns), batch_size, first.n_kv_heads, length, first.head_dim, dtype
        )

    model.make_cache = make_cache


def tp_full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole weights of a tensor-parallel model under their own names and in their own
    layout (gathered shards, fused rows put back in order): what one process would hold."""
    grouped = {
        f"{name}.{p}": module._tp_rows
        for name, module in model.named_modules()
        if hasattr(module, "_tp_rows")
        for p in ("weight", "bias")
    }
    out = {}
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if is_dtensor(tensor) else tensor
        if name in grouped:
            order = _row_order(*grouped[name])
            full = full[torch.argsort(order)]
        out[name] = full.detach()
    return out


def tp_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` rebuilt with each parameter group split into its sharded (DTensor) and whole
    parameters: a fused or foreach step takes one kind of tensor per group."""
    groups = []
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        for sharded in (True, False):
            params = [p for p in group["params"] if is_dtensor(p) == sharded]
            if params:
                groups.append({**settings, "params": params})
    accepted = inspect.signature(type(optimizer)).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(groups, **defaults)


def reduce_partial_grads(parameters: list[nn.Parameter]) -> None:
    """Sum the gradients that are still partial over the ranks (``Partial`` DTensors: what a
    sequence-parallel norm's weight gets, each rank holding its positions' share) into whole
    ones, in place, so that clipping and the optimizer see the true gradient."""
    from torch.distributed.tensor import Replicate

    for p in parameters:
        g = p.grad
        if is_dtensor(g) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, [Replicate()] * g.device_mesh.ndim)


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> Tensor:
    """Clip the global gradient norm over parameters of which some are sharded DTensors (tensor
    parallel) and some are whole on every rank: ||g||^2 = sum over shards (all-reduced) + the
    whole ones (counted once)."""
    import torch.distributed as dist

    reduce_partial_grads(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [g for g in grads if is_dtensor(g) and not g.placements[0].is_replicate()]
    ids = {id(g) for g in sharded}
    whole = [g.to_local() if is_dtensor(g) else g for g in grads if id(g) not in ids]
    local = torch.zeros((), dtype=torch.float32)
    for g in sharded:
        local = local + g.to_local().float().pow(2).sum().cpu()
    dist.all_reduce(local)
    total = local + sum((g.float().pow(2).sum().cpu() for g in whole), torch.zeros(()))
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        local_g = g.to_local() if is_dtensor(g) else g
        local_g.mul_(coef.to(local_g.device))
    return norm


# ---- tensor-parallel checkpoints in the single-process layout ---------------------------------


def _grouped_rows(model: nn.Module) -> dict[int, tuple[list[int], int]]:
    """id(parameter) -> (segments, ranks) of every fused projection whose rows were regrouped."""
    return {
        id(p): module._tp_rows
        for module in model.modules()
        if hasattr(module, "_tp_rows")
        for p in module.parameters(recurse=False)
    }


def _whole(value: Tensor, rows: tuple[list[int], int] | None) -> Tensor:
    full = value.full_tensor() if is_dtensor(value) else value
    if rows is not None and full.dim() > 0:
        full = full[torch.argsort(_row_order(*rows))]
    return full.detach().contiguous()


def _split_like(full: Tensor, param: Tensor, rows: tuple[list[int], int] | None) -> Tensor:
    """``full`` (single-process layout) as ``param`` holds it: rows regrouped, and this rank's
    shard as a DTensor of the same placement when ``param`` is one."""
    if rows is not None and full.dim() > 0:
        full = full[_row_order(*rows)]
    if not is_dtensor(param):
        return full
    local = full
    mesh = param.device_mesh
    for placement in param.placements:
        if placement.is_shard():
            local = local.chunk(mesh.size(), dim=placement.dim)[mesh.get_local_rank()]
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.contiguous(), mesh, param.placements, run_check=False)


def tp_checkpoint_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """A tensor-parallel model and its optimizer as one process would save them: the whole
    weights (tied ones once) and ``optim.<pid>.<name>`` tensors + JSON, where ``optimizer`` is the
    un-split one (:func:`tp_optimizer` shares its state). Every rank must call it (the shards are
    gathered); rank 0 writes the result."""
    from lmarch.train.state import optimizer_to_tensors

    rows = _grouped_rows(model)
    seen: set[int] = set()
    weights = {}
    for name, param in model.state_dict(keep_vars=True).items():
        if id(param) in seen:
            continue  # a tied alias (the output head of tied embeddings)
        seen.add(id(param))
        weights[name] = _whole(param, rows.get(id(param)))
    tensors, meta = optimizer_to_tensors(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    whole = {}
    for key, value in sorted(tensors.items()):
        pid = int(key.split(".")[1])
        whole[key] = _whole(value, rows.get(id(params[pid])))
    return weights, whole, meta


def tp_load_checkpoint_tensors(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, Tensor],
    optim_tensors: dict[str, Tensor],
    optim_meta: dict,
) -> None:
    """Load single-process checkpoint tensors into a tensor-parallel ``model`` and its un-split
    ``optimizer``: each rank keeps its shards (fused rows regrouped as :func:`tensor_parallel`
    does). The caller points the split optimizer at ``optimizer.state`` afterwards."""
    from lmarch.train.state import optimizer_from_tensors

    rows = _grouped_rows(model)
    named = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, full in weights.items():
            if name not in named:
                raise LmarchError(f"the checkpoint holds {name!r}, which this model has not")
            param = named[name]
            part = _split_like(full, param, rows.get(id(param)))
            target = param.to_local() if is_dtensor(param) else param
            target.copy_(part.to_local() if is_dtensor(part) else part)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    split = {}
    for key, value in optim_tensors.items():
        if key.startswith("optim."):
            param = params[int(key.split(".")[1])]
            if value.dim() > 0:
                value = _split_like(value, param, rows.get(id(param)))
            split[key] = value
    optimizer_from_tensors(optimizer, split, optim_meta)
