"""A llama.cpp GGUF straight into quantised layers: no float copy, no second rounding.

(Here in ``quant/`` rather than ``weights/``: it builds quantised layers, while ``weights/``
only reads and writes files. The native fast path is installed afterwards by the loader.)

Two targets. :func:`load_gguf_llama_blocks` keeps llama.cpp's blocks as they are in the file
(:class:`~lmarch.quant.blockq.BlockQ4Linear` for Q4_0/Q4_1,
:class:`~lmarch.quant.kquants.KQuantLinear` for Q4_K/Q6_K or
:class:`~lmarch.quant.blockq.BlockQ8Linear` for Q8_0, a Q8_0 or K-quant output head) and runs them
with lmarch's native CPU kernels — the fast path. :func:`load_gguf_llama_int4` maps them onto
PyTorch's int4 kernel layout, as follows.

llama.cpp's 4-bit block formats keep, for each block of 32 consecutive inputs of a row,
4-bit codes q and one or two half-precision numbers:

    Q4_0:  x = d (q - 8)          Q4_1:  x = d q + m

Our :class:`~lmarch.quant.int4.Int4WeightOnlyLinear` computes W~ = (q - 8) s + z per group of
inputs, so with groups of 32 both formats map onto it with the very same codes:

    Q4_0:  s = d, z = 0           Q4_1:  s = d, z = m + 8 d

The only change is that s and z are rounded to bfloat16 (the CPU kernel's type); quantising the
dequantised weights afresh would instead move most weights by up to half a step. Tensors of any
other type are dequantised and quantised with :func:`~lmarch.quant.int4.quantize_int4`.

Rows are output features, so llama.cpp's per-head row order for Q and K and our fused
``qkv`` / ``gate_up`` matrices are handled by the same name map as the float loader, applied
to codes, scales and zeros alike.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.nn.init import empty_weights
from lmarch.quant.blockq import BlockQ4Linear, BlockQ8Embedding, BlockQ8Linear, quantize_q4_1
from lmarch.quant.int4 import Int4WeightOnlyLinear, quantize_int4
from lmarch.quant.int8 import Int8WeightOnlyLinear
from lmarch.quant.kquants import NATIVE_KQUANTS, KQuantEmbedding, KQuantLinear, RowConcatLinear
from lmarch.weights.gguf import GGUFFile, read_gguf, unpack_nibbles
from lmarch.weights.gguf_kquants import _five_bit_codes
from lmarch.weights.gguf_llama import gguf_llama_map, llama_config_from_gguf
from lmarch.weights.name_map import Rule, WeightMap

GROUP = 32  # llama.cpp's block length, and the int4 group size used here
# bytes of the half-precision header of one block (d, or d and m), then 16 bytes of codes
_HEADER = {"Q4_0": 2, "Q4_1": 4}
HEAD_SCHEMES = ("int8", "int4", "bf16")
_CHUNK_BYTES = 1 << 24  # file bytes copied at a time out of a large Q8_0 tensor


def int4_rows(gguf: GGUFFile, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """Codes uint8 [N, K], scale and zero float32 [N, K/32] of the 2-D tensor ``name``, with
    (q - 8) * scale + zero equal to the file's weights (exactly, for Q4_0 and Q4_1)."""
    data, type_name, shape = gguf.raw(name)
    if type_name in _HEADER and len(shape) == 2:
        n, k = shape
        header = _HEADER[type_name]
        blocks = np.asarray(data).reshape(n, k // GROUP, header + GROUP // 2)
        halves = blocks[..., :header].copy().view("<f2").astype(np.float32)
        nibbles = blocks[..., header:]
        codes = np.empty((n, k // GROUP, GROUP), dtype=np.uint8)
        unpack_nibbles(nibbles, out=codes)  # low nibbles: elements 0..15, high: 16..31
        scale = halves[..., 0]
        zero = halves[..., 1] + 8.0 * scale if type_name == "Q4_1" else np.zeros_like(scale)
        return (
            torch.from_numpy(codes.reshape(n, k)),
            torch.from_numpy(scale),
            torch.from_numpy(zero),
        )
    q, sz = quantize_int4(gguf.load(name), GROUP)
    return q, sz[..., 0].t().float(), sz[..., 1].t().float()


def _map_rows(rule: Rule, parts: list[Tensor]) -> Tensor:
    """Apply a name-map rule's per-part row transforms, then fuse the parts along rows."""
    fns = rule.load_fns or (None,) * len(parts)
    rows = [fn(p) if fn is not None else p for fn, p in zip(fns, parts)]
    if len(rows) == 1:
        return rows[0]
    if rows[0].dtype == torch.bfloat16:  # numpy has no bfloat16
        return torch.cat(rows, dim=0)
    # numpy's single-threaded copy: torch.cat's threads spin-wait for a busy core (~10 ms a
    # call seen on a loaded 2-core machine, seconds over a model's fused projections)
    return torch.from_numpy(np.concatenate([r.numpy() for r in rows], axis=0))


def _q4_split(parts: list[np.ndarray], type_name: str) -> tuple[Tensor, Tensor]:
    """Q4_0 / Q4_1 rows uint8 [N_i, K/32 * block bytes], stacked in order -> packed codes uint8
    [sum N_i, K/2] and the float16 bits of (d, m) int16 [sum N_i, K/32, 2]: each byte copied
    once, straight into its place.

    The blocks are read as records (header, 16 bytes of codes) so that numpy moves each field
    as one item: ~2.5x faster than slicing the bytes [..., 4:] (a small model's load copies
    ~100 MB this way)."""
    header = _HEADER[type_name]
    record = np.dtype([("head", f"V{header}"), ("codes", f"V{GROUP // 2}")])
    n = sum(p.shape[0] for p in parts)
    nblocks = parts[0].shape[1] // record.itemsize
    codes = np.empty((n * nblocks, GROUP // 2), dtype=np.uint8)
    dm = np.empty((n * nblocks, 2), dtype=np.int16)
    codes_items = codes.view(f"V{GROUP // 2}")[:, 0]
    # Q4_1: d and m lie side by side, their 4 bytes are dm as it is kept; Q4_0: d only
    head_items = dm.view(np.uint32)[:, 0] if header == 4 else dm[:, 0]
    start = 0
    for rows in parts:
        stop = start + rows.shape[0] * nblocks
        blocks = np.ascontiguousarray(rows).reshape(-1).view(record)
        codes_items[start:stop] = blocks["codes"]
        head_items[start:stop] = blocks["head"].view(head_items.dtype)
        start = stop
    dm_t = torch.from_numpy(dm.reshape(n, nblocks, 2))
    if type_name == "Q4_0":  # x = d (q - 8) = d q + m with m = -8 d, exact in float16
        dm_t[..., 1] = (dm_t[..., 0].view(torch.float16) * -8).view(torch.int16)
    return torch.from_numpy(codes.reshape(n, -1)), dm_t


def q4_blocks(gguf: GGUFFile, name: str) -> tuple[Tensor, Tensor]:
    """The 2-D tensor ``name`` as Q4_1 blocks: packed codes uint8 [N, K/2] and the float16
    bits of (d, m) int16 [N, K/32, 2]. Q4_1 is copied as stored; Q4_0 (x = d (q - 8)) becomes
    m = -8 d exactly; other types are dequantised and quantised to Q4_1."""
    data, type_name, shape = gguf.raw(name)
    if type_name in _HEADER and len(shape) == 2:
        return _q4_split([data], type_name)  # copied straight out of the mapped file
    layer = BlockQ4Linear.from_codes(*quantize_q4_1(gguf.load(name)))
    return layer.codes, layer.dm


def _file_rows(data: np.ndarray) -> Tensor:
    """A read-only view of the file as a tensor, for row transforms that copy (never written:
    hence the silenced warning about numpy's read-only flag)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(data)


def q4_rule_blocks(gguf: GGUFFile, rule: Rule) -> tuple[Tensor, Tensor] | None:
    """The Q4_1 blocks (:func:`q4_blocks`) of a whole name-map rule when all its parts are 2-D
    and stored in the same one of Q4_0 / Q4_1, else None: the rule's row transforms are applied
    to the stored rows (a row of blocks is an output feature, like a row of weights), so each
    byte is copied out of the file once or twice instead of once a part, transform and field."""
    raws = [gguf.raw(name) for name in rule.parts]
    types = {type_name for _, type_name, _ in raws}
    if len(types) != 1 or not types <= _HEADER.keys() or any(len(s) != 2 for *_, s in raws):
        return None
    if len({s[1] for *_, s in raws}) != 1:  # fused parts share their input width
        return None
    fns = rule.load_fns or (None,) * len(raws)
    rows = [
        data if fn is None else fn(_file_rows(data)).numpy() for fn, (data, _, _) in zip(fns, raws)
    ]
    return _q4_split(rows, types.pop())


def q5_0_as_q8_0(blocks: np.ndarray) -> tuple[Tensor, Tensor]:
    """Q5_0 blocks uint8 [N, K/32 * 22] re-encoded as Q8_0: codes int8 [N, K] and the
    float16 bits of d int16 [N, K/32].

    Q5_0 stores x = d (q - 16) with q in 0..31 and a float16 d per block of 32; Q8_0 stores
    x = d c with c in -127..127. So c = q - 16 (in -16..15) under the same d gives every
    weight exactly: no value is rounded a second time."""
    n = blocks.shape[0]
    b = np.asarray(blocks).reshape(n, -1, 22)
    codes = (_five_bit_codes(b[..., 2:6], b[..., 6:]).view(np.int8) - np.int8(16)).reshape(n, -1)
    d_bits = np.ascontiguousarray(b[..., :2]).view(np.int16).reshape(n, -1)
    return torch.from_numpy(codes), torch.from_numpy(d_bits)


def q8_blocks(gguf: GGUFFile, name: str) -> tuple[Tensor, Tensor]:
    """The 2-D tensor ``name`` as Q8_0 blocks: codes int8 [N, K] and the float16 bits of d
    int16 [N, K/32]; a Q8_0 tensor is copied as stored, a Q5_0 one re-encoded exactly
    (:func:`q5_0_as_q8_0`), others are quantised."""
    data, type_name, shape = gguf.raw(name)
    if type_name == "Q5_0" and len(shape) == 2:
        return q5_0_as_q8_0(data)
    if type_name == "Q8_0" and len(shape) == 2:
        n, k = shape
        nb = k // GROUP
        # blocks read as records (d, 32 codes): numpy moves each field as one item (see
        # _q4_split)
        record = np.dtype([("d", "<i2"), ("codes", f"V{GROUP}")])
        blocks = np.ascontiguousarray(data).reshape(-1).view(record)
        codes = np.empty((n * nb, GROUP), dtype=np.int8)
        d_bits = np.empty(n * nb, dtype=np.int16)
        codes_items = codes.view(f"V{GROUP}")[:, 0]
        # a slice of rows at a time, its file pages let go once copied: an embedding table
        # (Gemma 3's is 178 MB) is never resident twice
        step = max(1, _CHUNK_BYTES // data.shape[-1])
        for r in range(0, n, step):
            part = blocks[r * nb : (r + step) * nb]
            codes_items[r * nb : (r + step) * nb] = part["codes"]
            d_bits[r * nb : (r + step) * nb] = part["d"]
            gguf.release(name, r * data.shape[-1], (r + step) * data.shape[-1])
        return torch.from_numpy(codes.reshape(n, k)), torch.from_numpy(d_bits.reshape(n, nb))
    layer = BlockQ8Linear.from_weight(gguf.load(name))
    return layer.codes, layer.d


def kquant_rows(gguf: GGUFFile, name: str) -> Tensor | None:
    """The stored rows of ``name`` as uint8 [N, K/256 * block bytes] when it is a 2-D Q4_K,
    Q5_K or Q6_K tensor (kept as stored under the q4 scheme), else None."""
    data, type_name, shape = gguf.raw(name)
    if type_name not in NATIVE_KQUANTS or len(shape) != 2:
        return None
    return torch.from_numpy(np.array(data))


def q4_scheme_linear(gguf: GGUFFile, rule: Rule) -> nn.Module:
    """The q4 scheme's layer for one name-map rule: Q4_K / Q5_K / Q6_K parts as stored in a
    :class:`~lmarch.quant.kquants.KQuantLinear`, anything else as Q4_1 blocks
    (:func:`q4_blocks`); a fused rule whose parts differ in kind becomes a
    :class:`~lmarch.quant.kquants.RowConcatLinear` of one layer a part."""
    types = {gguf.tensor_info(name).type_name for name in rule.parts}
    k_rows = [kquant_rows(gguf, name) for name in rule.parts]
    if len(types) == 1 and all(r is not None for r in k_rows):
        return KQuantLinear.from_blocks(_map_rows(rule, k_rows), types.pop())  # type: ignore[arg-type]
    if all(r is None for r in k_rows):
        whole = q4_rule_blocks(gguf, rule)
        if whole is not None:
            return BlockQ4Linear.from_blocks(*whole)
        pieces = [q4_blocks(gguf, name) for name in rule.parts]
        packed, dm = (_map_rows(rule, [p[j] for p in pieces]) for j in range(2))
        return BlockQ4Linear.from_blocks(packed, dm)
    fns = rule.load_fns or (None,) * len(rule.parts)
    return RowConcatLinear(
        [
            q4_scheme_linear(gguf, Rule(rule.ours, name, load_fns=(fn,)))
            for name, fn in zip(rule.parts, fns)
        ]
    )


# at most one parsed file, handed over from choosing a quantisation to the loader
_HANDED: list[tuple[tuple[str, int, int], GGUFFile]] = []


def _stamp(path: str | Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def hand_over(path: str | Path, gguf: GGUFFile) -> None:
    """Keep ``gguf``, just parsed from ``path`` to choose how to load it, for the next
    :func:`open_gguf` of the same unchanged file: the header (Gemma 3's holds 262,144 token
    strings, ~0.5 s to parse) is then read once per load, not twice."""
    _HANDED[:] = [(_stamp(path), gguf)]


def open_gguf(path: str | Path) -> GGUFFile:
    """``path`` parsed: the file :func:`hand_over` kept for it if it is unchanged (size and
    modification time; given out once), else :func:`~lmarch.weights.gguf.read_gguf`."""
    handed, _HANDED[:] = list(_HANDED), []
    if handed and handed[0][0] == _stamp(path):
        return handed[0][1]
    return read_gguf(path)


LinearFactory = Callable[[GGUFFile, Rule], nn.Module]
ConfigReader = Callable[[GGUFFile, int | None], LlamaConfig]


def _llama_config(gguf: GGUFFile, block_size: int | None) -> LlamaConfig:
    config = llama_config_from_gguf(gguf)
    if block_size is not None:
        config.block_size = min(block_size, config.block_size)
    return config


def _load_quantized(
    path: str | Path,
    block_size: int | None,
    make_linear: LinearFactory,
    dtype: torch.dtype,
    skip: Callable[[LlamaConfig, str], bool] = lambda config, ours: False,
    read_config: ConfigReader = _llama_config,
    name_map: Callable[[LlamaConfig], WeightMap] = gguf_llama_map,
) -> tuple[Llama, GGUFFile, LlamaConfig]:
    """A Llama whose every projection is ``make_linear(gguf, rule)``, other weights in ``dtype``
    except those ``skip(config, our_name)`` leaves to the caller; the output head is left for the
    caller too (it is still the meta Linear). ``read_config`` and ``name_map`` say how the
    file's architecture is read (LLaMA's by default; Gemma 3: :mod:`lmarch.quant.gguf_gemma`)."""
    gguf = open_gguf(path)
    config = read_config(gguf, block_size)
    for dim in (config.n_embd, config.intermediate_size, config.n_head * config.dim_per_head):
        if dim % GROUP:
            raise LmarchError(f"{path}: width {dim} is not a multiple of {GROUP}; load as float")
    with empty_weights():
        model = Llama(config)

    floats: dict[str, Tensor] = {}
    for rule in name_map(config)._expanded(config.n_layer):
        owner, _, attr = rule.ours.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if isinstance(module, nn.Linear) and attr == "weight":
            parent, _, child = owner.rpartition(".")
            setattr(model.get_submodule(parent), child, make_linear(gguf, rule))
        elif not skip(config, rule.ours):
            parts = [gguf.load(name, dtype=dtype) for name in rule.parts]
            floats[rule.ours] = _map_rows(rule, parts)
        else:
            continue
        for name in rule.parts:  # copied out: its pages of the file need not stay resident
            gguf.release(name)
    model.load_state_dict(floats, strict=False, assign=True)
    return model, gguf, config


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run PyTorch's operations single-threaded inside, restoring the thread count after.

    A load runs many small operations (the rotary tables, the model's construction, small
    casts); their second thread buys nothing and, on a machine with other busy processes,
    spin-waits for a core: the rotary tables alone took ~0.12 s with 2 threads there and
    ~0.005 s with one. The results are the same bits (elementwise operations)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _finish(model: Llama, path: str | Path, dtype: torch.dtype) -> Llama:
    for rotary in (model.rotary, model.rotary_local):
        if rotary is not None:  # rotary_local: Gemma 3's sliding layers
            rotary.reset_tables("cpu")
            rotary.to(dtype)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LmarchError(f"{path}: no weights for {left[:5]}")
    return model.eval()


def _head_name(gguf: GGUFFile, config: LlamaConfig, path: str | Path) -> str:
    if config.tie_embeddings:
        return "token_embd.weight"
    if "output.weight" not in gguf:
        raise LmarchError(f"{path}: tensor 'output.weight' is missing")
    return "output.weight"


def load_gguf_llama_blocks(
    path: str | Path, block_size: int | None = None, scheme: str = "q4"
) -> tuple[Llama, GGUFFile]:
    """A Llama for fast CPU decoding with lmarch's native block kernels, everything but the
    projections in float32. ``scheme="q4"``: every projection a
    :class:`~lmarch.quant.blockq.BlockQ4Linear` holding the file's own Q4_1 / Q4_0 blocks
    (Q4_K / Q5_K / Q6_K: a :class:`~lmarch.quant.kquants.KQuantLinear` of their own blocks);
    ``"q8"``: a :class:`~lmarch.quant.blockq.BlockQ8Linear` holding its Q8_0 blocks (tensors
    stored otherwise are quantised to the scheme). The output head is a
    :class:`~lmarch.quant.blockq.BlockQ8Linear` (the file's Q8_0 blocks when it stores them
    so, as llama.cpp's Q4 files do; a Q4_K / Q6_K head, as K-quant files store it, is a
    :class:`~lmarch.quant.kquants.KQuantLinear`; a tied embedding table shares its blocks).
    :func:`lmarch.load` then swaps in the native decoder layers (one native call per layer and
    decoded token)."""
    if scheme not in ("q4", "q8"):
        raise LmarchError(f"unknown block scheme {scheme!r}", hint="q4 or q8")

    def make_linear(gguf: GGUFFile, rule: Rule) -> nn.Module:
        if scheme == "q8":
            pieces = [q8_blocks(gguf, name) for name in rule.parts]
            codes, d = (_map_rows(rule, [p[j] for p in pieces]) for j in range(2))
            return BlockQ8Linear.from_blocks(codes, d)
        return q4_scheme_linear(gguf, rule)

    with one_thread():
        model, gguf, config = _load_quantized(
            path, block_size, make_linear, torch.float32, skip=tied_table
        )
        set_block_head(model, gguf, path)
        return _finish(model, path, torch.float32), gguf


def tied_table(config: LlamaConfig, ours: str) -> bool:
    """Whether ``ours`` is an embedding table the head shares (left to :func:`set_block_head`)."""
    return config.tie_embeddings and ours == "tok_emb.weight"


def set_block_head(model: Llama, gguf: GGUFFile, path: str | Path) -> None:
    """Give ``model`` its output head in blocks: a K-quant head as stored
    (:class:`~lmarch.quant.kquants.KQuantLinear`), any other as Q8_0 (:func:`q8_blocks`); a
    tied embedding table shares the head's blocks."""
    config = model.config
    head_name = _head_name(gguf, config, path)
    head_rows = kquant_rows(gguf, head_name)
    if head_rows is not None:  # a K-quant head (Q6_K in llama.cpp's K files) as stored
        model.lm_head = KQuantLinear.from_blocks(head_rows, gguf.tensor_info(head_name).type_name)
        if config.tie_embeddings:
            model.tok_emb = KQuantEmbedding.tied_to(model.lm_head)
    else:
        model.lm_head = BlockQ8Linear.from_blocks(*q8_blocks(gguf, head_name))
        if config.tie_embeddings:  # one Q8_0 table serves as embedding and head
            model.tok_emb = BlockQ8Embedding.tied_to(model.lm_head)
    gguf.release(head_name)


def load_gguf_llama_int4(
    path: str | Path, block_size: int | None = None, head: str = "int8"
) -> tuple[Llama, GGUFFile]:
    """A Llama for fast CPU decoding from a GGUF file: every projection an int4 layer built
    from the file's own codes, norms and embeddings in bfloat16, and the output head in
    ``head`` ("int8", "int4" or "bf16"; a head tied to the embeddings gets its own copy).

    Peak memory stays near the size of the file: nothing is expanded to float32 except,
    briefly, tensors stored in other formats.
    """
    if head not in HEAD_SCHEMES:
        raise LmarchError(f"unknown head scheme {head!r}", hint=f"one of {HEAD_SCHEMES}")

    def make_linear(gguf: GGUFFile, rule: Rule) -> nn.Module:
        pieces = [int4_rows(gguf, name) for name in rule.parts]
        codes, scale, zero = (_map_rows(rule, [p[j] for p in pieces]) for j in range(3))
        return Int4WeightOnlyLinear.from_codes(codes, scale, zero, GROUP)

    model, gguf, config = _load_quantized(path, block_size, make_linear, torch.bfloat16)
    head_name = _head_name(gguf, config, path)
    head_weight = (
        model.tok_emb.weight if config.tie_embeddings else gguf.load(head_name, torch.bfloat16)
    )
    if head == "int8":
        model.lm_head = Int8WeightOnlyLinear.from_weight(head_weight)
    elif head == "int4":
        model.lm_head = Int4WeightOnlyLinear.from_codes(
            *_quantized_rows(head_weight), group_size=GROUP
        )
    else:
        model.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False, device="cpu")
        model.lm_head.weight = nn.Parameter(head_weight, requires_grad=False)
    return _finish(model, path, torch.bfloat16), gguf


def _quantized_rows(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q, sz = quantize_int4(weight, GROUP)
    return q, sz[..., 0].t().float(), sz[..., 1].t().float()


__all__ = [
    "HEAD_SCHEMES",
    "hand_over",
    "int4_rows",
    "kquant_rows",
    "load_gguf_llama_blocks",
    "load_gguf_llama_int4",
    "one_thread",
    "open_gguf",
    "q4_blocks",
    "q4_rule_blocks",
    "q4_scheme_linear",
    "q5_0_as_q8_0",
    "q8_blocks",
    "set_block_head",
    "tied_table",
]
