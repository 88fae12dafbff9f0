"""The playground's attention maps equal transformers' ``output_attentions`` (eager attention)
for the same LLaMA weights, and the endpoint refuses layers and heads that do not exist."""

from __future__ import annotations

import httpx
import pytest
import torch

from lmarch.serve.attention_maps import attention_map

pytestmark = pytest.mark.usefixtures("one_thread")


def test_weights_equal_the_equation_written_out() -> None:
    """Layer 0 of a GPT by hand: softmax(q k^T / sqrt(d) + causal mask) of the first block's
    projections of LN(token + position embeddings)."""
    from lmarch.models import GPT, GPTConfig

    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        x = model.tok_emb.weight[ids] + model.pos_emb.weight[: len(ids)]
        q, k, _ = model.blocks[0].attn.qkv(model.blocks[0].norm_attn(x)).split(16, dim=-1)
        for head in range(2):
            qh, kh = q[:, head * 8 : head * 8 + 8], k[:, head * 8 : head * 8 + 8]
            scores = (qh @ kh.T) / 8**0.5
            scores = scores.masked_fill(torch.ones(8, 8).triu(1).bool(), float("-inf"))
            got = attention_map(model, ids, 0, head)
            torch.testing.assert_close(
                torch.tensor(got["weights"]), scores.softmax(-1), atol=1e-5, rtol=0
            )


@pytest.mark.slow
def test_weights_equal_transformers_output_attentions(tiny_llama, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from lmarch.weights.hf_llama import save_hf_llama

    model = tiny_llama(64).model
    save_hf_llama(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids = [5, 17, 30, 2, 44, 9, 12, 60, 61, 3]
    with torch.no_grad():
        want = hf(torch.tensor([ids]), output_attentions=True).attentions
    for layer, head in [(0, 0), (0, 3), (1, 2)]:
        got = attention_map(model, ids, layer, head)
        assert (got["n_layers"], got["n_heads"]) == (2, 4)
        torch.testing.assert_close(
            torch.tensor(got["weights"]), want[layer][0, head].float(), atol=2e-5, rtol=0
        )


def test_endpoint_shape_and_refusals(live_server) -> None:
    url, key = live_server.url + "/v1/attention", {"Authorization": "Bearer sk-test"}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    data = httpx.post(url, json={"messages": messages, "layer": 1, "head": 3}, headers=key).json()
    assert "".join(data["tokens"]) == "<user>hi\n<assistant>yo\n"
    weights = torch.tensor(data["weights"])
    assert weights.shape == (len(data["tokens"]),) * 2
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(weights)), atol=1e-4, rtol=0)
    assert bool((weights.triu(1) == 0).all())  # causal: nothing from the future
    for body, words in [
        ({"text": "hi", "layer": 2}, "layer 2 does not exist: the model has 2"),
        ({"text": "hi", "head": 4}, "head 4 does not exist: layer 0 has 4"),
        ({"layer": 0}, "give either messages or text"),
        ({"text": "a" * 200}, "the text has 200 tokens; the view takes 1 to 128"),
    ]:
        response = httpx.post(url, json=body, headers=key)
        assert response.status_code == 400 and words in response.json()["error"]["message"]
