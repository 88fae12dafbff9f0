"""The docs point at things that exist: every relative link in README.md and docs/ resolves to a
file, every code symbol cited as `path::name` is defined in that file, every figure the docs
show is one that docs/make_figures.py makes, and the measured table of 03-llms.md is current."""

from __future__ import annotations

import ast
import importlib.util
import re
from functools import cache
from pathlib import Path

import pytest
from doc_blocks import REPO, doc_files

LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")
SYMBOL = re.compile(r"`([\w./-]+\.py)::([\w.]+)`")
THEORY = REPO / "docs" / "theory"
PAGES = [
    "01-attention.md",
    "02-transformer.md",
    "03-llms.md",
    "04-training.md",
    "05-applications.md",
    "06-hands-on.md",
]


def _prose(path: Path) -> str:
    """The file without its fenced code blocks (a link inside code is not a link)."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name


@cache
def _defined(path: Path) -> frozenset[str]:
    """Names a module defines: top-level functions, classes and assignments, and
    ``Class.member`` for what a class body defines."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return [node.name]
        if isinstance(node, ast.Assign):
            return [t.id for t in node.targets if isinstance(t, ast.Name)]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            return [node.target.id]
        return []

    for node in tree.body:
        names.update(targets(node))
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{n}" for child in node.body for n in targets(child))
    return frozenset(names)


def check_file(path: Path) -> list[str]:
    """Every problem with the links and cited symbols of one Markdown file."""
    problems = []
    text = _prose(path)
    for label, target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor in the same page
        resolved = (path.parent / target.split("#")[0]).resolve()
        if not resolved.exists():
            problems.append(f"{_rel(path)}: link to {target} does not resolve")
            continue
        cited = SYMBOL.search(label)
        if cited and (REPO / cited.group(1)).resolve() != resolved:
            problems.append(f"{_rel(path)}: {label} links to {target}, another file")
    for file, name in SYMBOL.findall(text):
        source = REPO / file
        if not source.is_file():
            problems.append(f"{_rel(path)}: {file}::{name}: no such file")
        elif name not in _defined(source):
            problems.append(f"{_rel(path)}: {file}::{name}: not defined there")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=_rel)
def test_links_and_symbols_resolve(path: Path):
    assert check_file(path) == []


def test_the_checker_sees_a_broken_link_and_a_missing_symbol(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](page.md) [gone](missing.md) `lmarch/nn/attention.py::MultiHeadAttention.forward`\n"
        "`lmarch/nn/attention.py::no_such_function` [web](https://example.org)\n"
        "```bash\n[in code](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    problems = [p.split(": ", 1)[1] for p in check_file(page)]
    assert problems == [
        "link to missing.md does not resolve",
        "lmarch/nn/attention.py::no_such_function: not defined there",
    ]


def test_theory_pages_exist_and_cite_the_code():
    for name in PAGES:
        text = (THEORY / name).read_text(encoding="utf-8")
        assert "$" in text, f"{name} has no equation"
        assert len(SYMBOL.findall(text)) >= 3, f"{name} cites fewer than 3 code symbols"


def _make_figures():
    spec = importlib.util.spec_from_file_location("make_figures", REPO / "docs/make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_doc_figures_are_made_by_the_script():
    """Every figure a page shows from docs/figures/ is one make_figures.py makes, and it makes
    no figure that no page shows."""
    made = set(_make_figures().FIGURES_MADE)
    figures = REPO / "docs" / "figures"
    shown = set()
    for page in doc_files():
        for _, target in LINK.findall(_prose(page)):
            path = (page.parent / target).resolve()
            if path.parent == figures and path.suffix in {".png", ".svg"}:
                shown.add(path.name)
    assert shown == made
    assert all((figures / f).is_file() for f in made)


def test_measured_table_is_current():
    """The table in 03-llms.md is what make_figures.py generates now from
    docs/compare/rows.json and the preset registry (rerun `make docs` when this fails)."""
    mf = _make_figures()
    table = mf.analysis_table()
    assert mf.table_in_file() == table
    assert "| gpt2 | decoder, causal LM (Radford et al. 2019) | 124.4M |" in table
    assert "| lstm (char) | recurrent (LSTM) | 878,855 |" in table
