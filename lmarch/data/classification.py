"""Labelled text for sequence classification: JSONL files and the bundled "shakespeare-genre" task.

A JSONL file holds one object per line, ``{"text": "...", "label": "..."}`` (labels may be
strings or integers; they are kept as strings). The bundled task cuts every play of
:func:`lmarch.data.corpus.shakespeare_documents` into passages of consecutive spoken lines and
labels each passage with its play's genre. Its train/test split is made *by play*: a play is
wholly on one side, so a model cannot score by recognising a play's characters or plot, only by
what a genre sounds like.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lmarch.data.corpus import Document, shakespeare_documents
from lmarch.data.masking import pad_sequences
from lmarch.errors import LmarchError

SHAKESPEARE_GENRE = "shakespeare-genre"
_JSONL_HINT = 'each line must be a JSON object such as {"text": "...", "label": "..."}'


@dataclass(frozen=True)
class Example:
    """One labelled text; ``group`` names where it came from (a play, a file line)."""

    text: str
    label: str
    group: str = ""


@dataclass
class ClassificationData:
    """Train and test examples with the sorted label set; ``name`` says where they came from."""

    name: str
    train: list[Example]
    test: list[Example]
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.labels:
            self.labels = sorted({ex.label for ex in self.train + self.test})

    def label_ids(self, examples: Sequence[Example]) -> list[int]:
        """Each example's label as its index in :attr:`labels`."""
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[ex.label] for ex in examples]


# --- JSONL --------------------------------------------------------------------------------------


def read_jsonl_examples(path: str | Path) -> list[Example]:
    """Read ``{"text", "label"}`` rows from a JSONL file (blank lines are skipped).

    Any problem (missing file, bad JSON, missing or empty text, missing label, no rows) raises
    :class:`LmarchError` naming the file and line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmarchError(
            f"data file not found: {path}", hint="give a .jsonl file or 'shakespeare-genre'"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise LmarchError(f"{path} is not valid UTF-8 (byte {exc.start})") from exc
    except OSError as exc:
        raise LmarchError(f"cannot read {path}: {exc.strerror or exc}") from exc
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmarchError(
                f"{path}, line {number}: not valid JSON ({exc.msg})", hint=_JSONL_HINT
            ) from exc
        if not isinstance(row, dict):
            raise LmarchError(f"{path}, line {number}: not a JSON object", hint=_JSONL_HINT)
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            raise LmarchError(
                f'{path}, line {number}: no non-empty "text" string', hint=_JSONL_HINT
            )
        if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label) == "":
            raise LmarchError(
                f'{path}, line {number}: "label" must be a non-empty string or an integer',
                hint=_JSONL_HINT,
            )
        examples.append(Example(text=text, label=str(label), group=f"{path.name}:{number}"))
    if not examples:
        raise LmarchError(f"{path} holds no examples", hint=_JSONL_HINT)
    return examples


def stable_rank(text: str, seed: int) -> str:
    """A seeded, platform-independent sort key for deterministic splits (SHA-256 of seed and text)."""
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def split_examples(
    examples: Sequence[Example], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """A deterministic train/test split that keeps the label mix: within each label, examples
    are ordered by a seeded hash of their text and the first ``test_fraction`` go to test
    (at least one when a label has two or more examples)."""
    if not 0.0 < test_fraction < 1.0:
        raise LmarchError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    test_ids: set[int] = set()
    for items in by_label.values():
        ranked = sorted(range(len(items)), key=lambda i: stable_rank(items[i].text + str(i), seed))
        n_test = max(1, round(len(items) * test_fraction)) if len(items) >= 2 else 0
        test_ids.update(id(items[i]) for i in ranked[:n_test])
    train = [ex for ex in examples if id(ex) not in test_ids]
    test = [ex for ex in examples if id(ex) in test_ids]
    return train, test


# --- the bundled genre task ---------------------------------------------------------------------


def spoken_lines(document: Document) -> list[str]:
    """The spoken lines of a play in tinyshakespeare layout (speaker headings dropped)."""
    lines = []
    for block in document.text.split("\n\n"):
        rows = [row for row in block.split("\n") if row.strip()]
        lines.extend(rows[1:])  # rows[0] is "SPEAKER:"
    return lines


def play_passages(
    document: Document, lines_per_passage: int = 5, max_passages: int | None = None
) -> list[str]:
    """Consecutive, non-overlapping runs of ``lines_per_passage`` spoken lines, joined by
    newlines. With ``max_passages`` an evenly spaced subset of that many is kept, so a cap
    still samples the whole play rather than its first act."""
    if lines_per_passage < 1:
        raise LmarchError(f"lines_per_passage must be >= 1, got {lines_per_passage}")
    lines = spoken_lines(document)
    passages = [
        "\n".join(lines[i : i + lines_per_passage])
        for i in range(0, len(lines) - lines_per_passage + 1, lines_per_passage)
    ]
    if max_passages is not None and len(passages) > max_passages:
        step = len(passages) / max_passages
        passages = [passages[int(k * step)] for k in range(max_passages)]
    return passages


def split_plays_by_genre(
    documents: Sequence[Document], test_fraction: float = 0.25, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split whole plays into train and test, per genre: each genre's plays are ordered by a
    seeded hash of their title and the first ``round(n * test_fraction)`` (at least one) go to
    test, so every genre appears on both sides and no play on both."""
    by_genre: dict[str, list[Document]] = {}
    for doc in documents:
        if doc.genre is None:
            raise LmarchError(f"play {doc.name!r} has no genre")
        by_genre.setdefault(doc.genre, []).append(doc)
    test_names: set[str] = set()
    for plays in by_genre.values():
        if len(plays) < 2:
            raise LmarchError(f"genre {plays[0].genre!r} has one play; a by-play split needs two")
        ranked = sorted(plays, key=lambda d: stable_rank(d.name, seed))
        n_test = min(len(plays) - 1, max(1, round(len(plays) * test_fraction)))
        test_names.update(d.name for d in ranked[:n_test])
    train = [d for d in documents if d.name not in test_names]
    test = [d for d in documents if d.name in test_names]
    return train, test


def shakespeare_genre(
    train_passages_per_play: int | None = 40,
    test_passages_per_play: int | None = 40,
    lines_per_passage: int = 5,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> ClassificationData:
    """The bundled task: passages of ``lines_per_passage`` spoken lines -> the play's genre
    (comedies, histories, problems, roman, romances, tragedies), split by play.

    Passages per play are capped (evenly spaced) so that every play weighs the same and a CPU
    fine-tuning run stays short; ``None`` keeps them all (about 20,000 in total).
    """
    train_docs, test_docs = split_plays_by_genre(shakespeare_documents(), test_fraction, seed)

    def examples(docs: list[Document], cap: int | None) -> list[Example]:
        return [
            Example(text=p, label=str(d.genre), group=d.name)
            for d in docs
            for p in play_passages(d, lines_per_passage, cap)
        ]

    return ClassificationData(
        name=SHAKESPEARE_GENRE,
        train=examples(train_docs, train_passages_per_play),
        test=examples(test_docs, test_passages_per_play),
    )


def load_classification_data(
    spec: str, test_fraction: float = 0.2, seed: int = 0, **task_options
) -> ClassificationData:
    """``"shakespeare-genre"`` (options go to :func:`shakespeare_genre`) or a JSONL file split
    with :func:`split_examples`. A file named ``X.test.jsonl`` beside ``X.jsonl`` (or
    ``X.train.jsonl``) is used as the test set instead of a split."""
    if spec == SHAKESPEARE_GENRE:
        return shakespeare_genre(seed=seed, **task_options)
    path = Path(spec).expanduser()
    examples = read_jsonl_examples(path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    stem = stem[: -len(".train")] if stem.endswith(".train") else stem
    test_path = path.with_name(f"{stem}.test.jsonl")
    if test_path.is_file() and test_path != path:
        train, test = examples, read_jsonl_examples(test_path)
    else:
        train, test = split_examples(examples, test_fraction, seed)
    data = ClassificationData(name=str(path), train=train, test=test)
    if len(data.labels) < 2:
        raise LmarchError(f"{path} has only one label ({data.labels[0]!r}); need two or more")
    if not data.test:
        raise LmarchError(f"{path} is too small to hold out a test set", hint="add more rows")
    return data


class ClassificationBatches:
    """Random batches of tokenised examples for the Trainer (the same interface as
    :class:`lmarch.data.batches.RandomBlockSampler`): ``(input_ids, attention_mask,
    token_type_ids, labels)``, padded to the longest row of the batch."""

    def __init__(
        self,
        input_ids: Sequence[Sequence[int]],
        token_type_ids: Sequence[Sequence[int]],
        labels: Sequence[int],
        batch_size: int,
        pad_id: int,
        seed: int = 0,
    ) -> None:
        if not input_ids or len(input_ids) != len(labels) or len(token_type_ids) != len(labels):
            raise ValueError("need one id list, one type list and one label per example")
        self.input_ids = [list(x) for x in input_ids]
        self.token_type_ids = [list(x) for x in token_type_ids]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.batch_size = batch_size
        self.block_size = max(len(x) for x in self.input_ids)
        self.pad_id = pad_id
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """One batch drawn (with replacement) from ``generator`` (default: the sampler's own)."""
        g = generator or self.generator
        rows = torch.randint(len(self.labels), (self.batch_size,), generator=g)
        ids, mask = pad_sequences([self.input_ids[r] for r in rows.tolist()], self.pad_id)
        types, _ = pad_sequences([self.token_type_ids[r] for r in rows.tolist()], 0)
        return ids, mask, types, self.labels[rows]


__all__ = [
    "SHAKESPEARE_GENRE",
    "ClassificationBatches",
    "ClassificationData",
    "Example",
    "load_classification_data",
    "play_passages",
    "read_jsonl_examples",
    "shakespeare_genre",
    "split_examples",
    "split_plays_by_genre",
    "spoken_lines",
]
