"""Sentence embeddings from an encoder, and cosine nearest-neighbour search over a file of lines.

A sentence's vector is the encoder's last hidden states pooled the way the model was trained
to be used (Sentence-BERT, Reimers & Gurevych 2019: the mean over real tokens for
all-MiniLM-L6-v2), L2-normalised when the model says so. For unit vectors the cosine
similarity is a dot product, cos(q, d) = q . d, so search is one matrix-vector product.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.loading import LoadedModel, Pooling, load
from lmarch.models.heads import encoder_of
from lmarch.nn.pooling import POOLING_MODES, l2_normalize, pool

VECTOR_SUFFIXES = (".npy", ".safetensors")
DEFAULT_MAX_LENGTH = 512


@dataclass
class Encoder:
    """What embedding needs from a loaded model: the bare encoder, its tokenizer, how to pool
    and normalise, and the longest input (longer texts are cut, as the reference does)."""

    model: nn.Module
    tokenizer: object
    pooling: str = "mean"
    normalize: bool = True
    max_length: int = DEFAULT_MAX_LENGTH
    name: str = ""


def encoder_from_loaded(loaded: LoadedModel, command: str = "embed") -> Encoder:
    """The bare encoder inside ``loaded`` (see :func:`lmarch.models.heads.encoder_of`) with
    the pooling and normalisation the model ships with (``loaded.pooling``); a model that is
    not a BERT-family encoder is refused in ``command``'s name."""
    loaded.require("encoder", command)
    encoder = encoder_of(loaded.model)
    if not hasattr(loaded.tokenizer, "encode_batch"):
        raise LmarchError(
            f"{loaded.name} has no encoder tokenizer (one that pads a batch)",
            hint="use an encoder such as minilm-l6, a BERT-family HF folder or an mlm/rtd run",
        )
    pooling = loaded.pooling or Pooling()
    if pooling.mode not in POOLING_MODES:
        raise LmarchError(f"{loaded.name}: unknown pooling {pooling.mode!r}")
    limit = getattr(getattr(encoder, "config", None), "max_positions", DEFAULT_MAX_LENGTH)
    max_length = min(pooling.max_length or limit, limit)
    return Encoder(
        encoder.eval(), loaded.tokenizer, pooling.mode, pooling.normalize, max_length, loaded.name
    )


def load_encoder(spec: str, command: str = "embed") -> Encoder:
    """An encoder from anything :func:`lmarch.load` reads that holds a BERT-family model: a
    preset with weights (``minilm-l6``), a Hugging Face folder, an mlm/rtd run folder (the
    masked LM's encoder, or ELECTRA's discriminator's, mean-pooled) or a classifier run."""
    return encoder_from_loaded(load(spec, quant="none"), command)


def tokenize_batch(encoder: Encoder, texts: Sequence[str]) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` as padded int64 tensors."""
    batch = encoder.tokenizer.encode_batch(list(texts), max_length=encoder.max_length)
    return {
        key: torch.as_tensor(batch[key], dtype=torch.long)
        for key in ("input_ids", "attention_mask", "token_type_ids")
    }


@torch.no_grad()
def embed_texts(
    encoder: Encoder,
    texts: Sequence[str],
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embeddings [N, H] (float32) of ``texts``. Texts are batched in order of length so that
    little compute goes to padding, and returned in the order given; ``on_batch(n)`` is called
    after each batch of n texts (a progress bar)."""
    if batch_size < 1:
        raise LmarchError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    dim = getattr(getattr(encoder.model, "config", None), "n_embd", None)
    out = np.zeros((len(texts), dim or 0), dtype=np.float32)
    device = next(encoder.model.parameters()).device
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {
            k: v.to(device) for k, v in tokenize_batch(encoder, [texts[i] for i in rows]).items()
        }
        hidden = encoder.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        vectors = pool(hidden.float(), batch["attention_mask"], encoder.pooling)
        if encoder.normalize:
            vectors = l2_normalize(vectors)
        if out.shape[1] != vectors.shape[1]:
            out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        out[rows] = vectors.cpu().numpy()
        if on_batch is not None:
            on_batch(len(rows))
    return out


def read_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, without surrounding whitespace."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmarchError(f"file not found: {path}", hint="give a text file, one sentence a line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LmarchError(f"{path} is not valid UTF-8 (byte {exc.start})") from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise LmarchError(f"{path} has no non-empty lines")
    return lines


def save_vectors(
    path: str | Path, vectors: np.ndarray, metadata: dict[str, str] | None = None
) -> None:
    """Write [N, H] vectors as ``.npy`` or as ``.safetensors`` (tensor ``embeddings``, with
    ``metadata`` as its string header)."""
    path = Path(path)
    if path.suffix not in VECTOR_SUFFIXES:
        raise LmarchError(
            f"cannot write vectors to {path.name}",
            hint="the output must end in .npy or .safetensors",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, vectors)
    else:
        from safetensors.numpy import save_file

        save_file({"embeddings": np.ascontiguousarray(vectors)}, str(path), metadata=metadata)


def load_vectors(path: str | Path) -> tuple[np.ndarray, dict[str, str]]:
    """Read what :func:`save_vectors` wrote: (vectors, metadata; empty for ``.npy``)."""
    path = Path(path)
    if not path.is_file():
        raise LmarchError(f"vectors file not found: {path}")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), {}
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            return f.get_tensor("embeddings"), dict(f.metadata() or {})
    except Exception as exc:  # a damaged or foreign file: one clear line
        raise LmarchError(f"cannot read vectors from {path}: {exc}") from exc


def _progress(total: int, label: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def embed_lines(
    encoder: Encoder, lines: Sequence[str], batch_size: int = 64, progress: bool = True
) -> np.ndarray:
    """:func:`embed_texts` with a rich progress bar on stderr."""
    if not progress:
        return embed_texts(encoder, lines, batch_size)
    with _progress(len(lines), "embed") as bar:
        task = bar.add_task("embed", total=len(lines))
        return embed_texts(encoder, lines, batch_size, lambda n: bar.advance(task, n))


def embed_file(
    model: str | Encoder,
    path: str | Path,
    out: str | Path,
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    """Embed every non-empty line of ``path`` with ``model`` and write the vectors to ``out``
    (.npy or .safetensors). Returns a summary: lines, dimension, output path."""
    out = Path(out)
    if out.suffix not in VECTOR_SUFFIXES:
        raise LmarchError(
            f"cannot write vectors to {out.name}",
            hint="the output must end in .npy or .safetensors",
        )
    encoder = load_encoder(model) if isinstance(model, str) else model
    lines = read_lines(path)
    vectors = embed_lines(encoder, lines, batch_size, progress)
    save_vectors(out, vectors, {"model": encoder.name, "source": str(path)})
    return {
        "lines": len(lines),
        "dim": int(vectors.shape[1]),
        "out": str(out),
        "model": encoder.name,
    }


# --- search -------------------------------------------------------------------------------------


def _digest(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def default_cache_path(index: str | Path, model_name: str) -> Path:
    """Where the index's embeddings are kept: beside the file, named after the model."""
    index = Path(index)
    slug = (
        "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_name).name) or "model"
    )
    return index.with_name(f"{index.name}.{slug}.safetensors")


def index_vectors(
    encoder: Encoder,
    index: str | Path,
    cache: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[list[str], np.ndarray, bool]:
    """Lines of ``index`` and their embeddings, from the cache when it was made by the same
    model from the same lines (checked by a SHA-256 of the lines), else computed and cached.
    Returns ``(lines, vectors, from_cache)``."""
    lines = read_lines(index)
    digest = _digest(lines)
    cache = Path(cache) if cache is not None else default_cache_path(index, encoder.name)
    if cache.suffix != ".safetensors":
        raise LmarchError(f"the index cache must be a .safetensors file, not {cache.name}")
    if cache.is_file():
        try:
            vectors, meta = load_vectors(cache)
        except LmarchError:
            meta = {}
        if meta.get("sha256") == digest and meta.get("model") == encoder.name:
            return lines, vectors, True
    vectors = embed_lines(encoder, lines, batch_size, progress)
    save_vectors(cache, vectors, {"model": encoder.name, "sha256": digest, "source": str(index)})
    return lines, vectors, False


def nearest(vectors: np.ndarray, query: np.ndarray, top_k: int) -> list[tuple[int, float]]:
    """Indices and cosine similarities of the ``top_k`` rows of ``vectors`` closest to
    ``query``, best first: cos(q, d) = q . d / (|q| |d|)."""
    norms = np.linalg.norm(vectors, axis=1) * max(float(np.linalg.norm(query)), 1e-12)
    scores = vectors @ query / np.maximum(norms, 1e-12)
    k = min(top_k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [(int(i), float(scores[i])) for i in top]


def search(
    model: str | Encoder,
    index: str | Path,
    query: str,
    top_k: int = 5,
    cache: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """The ``top_k`` lines of the file ``index`` nearest to ``query`` by cosine similarity of
    their embeddings: ``[{"rank", "line", "text", "score"}]`` (``line`` counts non-empty lines
    from 1)."""
    if top_k < 1:
        raise LmarchError(f"--top-k must be >= 1, got {top_k}")
    if not query.strip():
        raise LmarchError("the query is empty")
    encoder = load_encoder(model, "search") if isinstance(model, str) else model
    lines, vectors, _ = index_vectors(encoder, index, cache, progress=progress)
    q = embed_texts(encoder, [query])[0]
    return [
        {"rank": r + 1, "line": i + 1, "text": lines[i], "score": score}
        for r, (i, score) in enumerate(nearest(vectors, q, top_k))
    ]


__all__ = [
    "Encoder",
    "default_cache_path",
    "embed_file",
    "embed_lines",
    "embed_texts",
    "encoder_from_loaded",
    "index_vectors",
    "load_encoder",
    "load_vectors",
    "nearest",
    "read_lines",
    "save_vectors",
    "search",
]
