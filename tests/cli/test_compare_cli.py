"""lmarch compare: the table, the JSON rows, the plot, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_prints_rows_and_writes_the_plot(
    cli, tmp_path: Path, shakespeare_text: str
) -> None:
    data = tmp_path / "text.txt"
    data.write_text(shakespeare_text[:60_000], encoding="utf-8")
    out = tmp_path / "cmp"
    summary = cli.json(
        "compare", "--data", str(data), "--models", "ngram,gru,llama", "--max-steps", "5",
        "--budget-seconds", "600", "--ngram-order", "3", "--out", str(out),
    )  # fmt: skip
    assert [r["model"] for r in summary["rows"]] == ["ngram", "gru", "llama"]
    for row in summary["rows"]:
        assert {"model", "params", "val_loss", "tokens_per_s", "bits_per_char"} <= set(row)
    assert summary["rows"][1]["steps"] == 5
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "rows.json").is_file()
    assert summary["verdict"].startswith(("validation loss follows", "the expected order"))


def test_compare_refuses_bad_input(cli, tmp_path: Path) -> None:
    assert "unknown model(s) lstm2" in cli.error("compare", "--models", "ngram,lstm2")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n", encoding="utf-8")
    assert "holds no text" in cli.error("compare", "--data", str(empty), "--models", "ngram")
    assert "n-gram order must be >= 1" in cli.error("compare", "--ngram-order", "0")
