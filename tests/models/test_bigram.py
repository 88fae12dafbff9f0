"""The bigram baseline reaches the best loss a bigram model can have: the empirical conditional
entropy H(next | current) counted from the text."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmarch.models import BigramConfig, BigramLM
from lmarch.tokenizers import CharTokenizer


def test_bigram_converges_to_empirical_conditional_entropy(shakespeare_text) -> None:
    text = shakespeare_text[:50_000]
    tok = CharTokenizer.from_text(text)
    ids = torch.tensor(tok.encode(text))
    v = tok.vocab_size
    counts = torch.zeros(v, v).index_put_(
        (ids[:-1], ids[1:]), torch.ones(len(ids) - 1), accumulate=True
    )
    p_next = counts / counts.sum(1, keepdim=True).clamp_min(1)
    entropy = -(counts * torch.log(p_next.clamp_min(1e-30))).sum() / counts.sum()

    torch.manual_seed(0)
    model = BigramLM(BigramConfig(vocab_size=v))
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    x, y = ids[:-1][None], ids[1:][None]
    for _ in range(150):
        loss = F.cross_entropy(model(x)[0], y[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert 2.3 < entropy.item() < 2.6  # characters of English: about 2.45 nats given the last one
    assert abs(loss.item() - entropy.item()) < 0.01
