"""``lmarch tfidf``: TF-IDF over documents (files, or the bundled plays, one document per play),
each document's heaviest terms and its nearest documents by cosine similarity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lmarch.classic.tfidf import Tfidf, TfidfConfig, cosine_similarities, top_terms
from lmarch.data.corpus import Document, load_documents
from lmarch.errors import LmarchError


def read_documents(sources: Sequence[str]) -> list[Document]:
    """The documents of ``sources``: ``shakespeare`` gives its 38 plays, a folder every ``.txt``
    file under it, any other path one document (see :func:`lmarch.data.corpus.load_documents`)."""
    if not sources:
        raise LmarchError("no documents given", hint="give files, a folder, or 'shakespeare'")
    docs = [doc for source in sources for doc in load_documents(source)]
    if not any(doc.text.strip() for doc in docs):
        raise LmarchError("the documents hold no text")
    return docs


def tfidf_report(
    sources: Sequence[str], config: TfidfConfig, top: int = 10, nearest: int = 3
) -> dict:
    """Fit TF-IDF on the documents of ``sources``; per document, its ``top`` terms by weight
    and its ``nearest`` other documents by cosine similarity."""
    if top < 0 or nearest < 0:
        raise LmarchError("--top and --nearest must be >= 0")
    docs = read_documents(sources)
    model = Tfidf(config)
    matrix = model.fit_transform([doc.text for doc in docs])
    sims = cosine_similarities(matrix)
    rows = []
    for i, doc in enumerate(docs):
        order = [j for j in np.argsort(-sims[i], kind="stable").tolist() if j != i][:nearest]
        rows.append(
            {
                "name": doc.name,
                "top_terms": [[t, round(w, 6)] for t, w in top_terms(matrix, model.terms, i, top)],
                "nearest": [[docs[j].name, round(float(sims[i, j]), 6)] for j in order],
            }
        )
    return {"documents": rows, "terms": len(model.terms), "nonzeros": int(matrix.nnz)}
