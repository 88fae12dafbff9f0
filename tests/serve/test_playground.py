"""The playground in a real browser (Playwright driving Debian's Chromium): a streamed chat
answer, token probabilities on hover, the attention view, and nearest lines by embedding."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="no Chromium at /usr/bin/chromium (make test installs it with apt-get install "
        "chromium where apt-get can)",
    ),
    pytest.mark.usefixtures("one_thread"),
]


def test_chat_hover_attention_and_embeddings(live_server, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    import openai

    scheduler = live_server.state.scheduler
    decode = scheduler.engine.decode

    def slow_decode(tokens, positions):  # 40 ms a step, so the stream is seen growing
        time.sleep(0.04)
        return decode(tokens, positions)

    scheduler.engine.decode = slow_decode
    expect = sync_api.expect
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(live_server.url + "/")
            expect(page.locator("#model-name")).to_have_text("tiny-llama + minilm-l6")
            page.fill("#api-key", "sk-test")
            page.eval_on_selector(
                "#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }"
            )
            page.fill("#max-tokens", "16")
            page.fill("#prompt", "Hello there")
            page.click("#send")
            answer = page.locator(".message.assistant .content").last
            tokens = answer.locator(".token")
            # streamed: part of the answer is on the page while the rest is being generated
            page.wait_for_function(
                "() => { const n = document.querySelectorAll('.message.assistant .token').length;"
                " return n > 0 && n < 16 && document.getElementById('status').textContent"
                " === 'generating…'; }"
            )
            expect(page.locator("#status")).to_have_text("done: 16 tokens (length)", timeout=20_000)
            assert tokens.count() == 16
            client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="sk-test")
            want = client.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": "Hello there"}],
                max_tokens=16, temperature=0,
            ).choices[0].message.content  # fmt: skip
            assert answer.text_content() == want

            tokens.nth(3).hover()
            tooltip = page.locator("#tooltip")
            expect(tooltip).to_be_visible()
            expect(tooltip).to_contain_text(re.compile(r"p = 0\.\d{3}"))
            assert tooltip.locator("tr").count() == 5  # the five likeliest alternatives
            assert tooltip.locator("tr.chosen").count() == 1  # greedy: the pick is among them

            page.click("#show-attention")
            info = page.locator("#attn-info")
            expect(info).to_contain_text("layer 1 of 2, head 1 of 4")
            assert page.locator("#attn-layer option").count() == 2
            assert page.locator("#attn-head option").count() == 4
            page.select_option("#attn-head", label="3")  # shown 1..4, the third head
            expect(info).to_contain_text("head 3 of 4")
            n_tokens = len("<user>Hello there\n<assistant>") + len(want) + 1
            expect(info).to_contain_text(f"{n_tokens} tokens")
            assert page.locator("#attn-strip span").count() == n_tokens
            assert page.eval_on_selector("#attn-canvas", "c => c.dataset.tokens") == str(n_tokens)
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            page.click("#tab-embed")
            page.fill("#embed-lines", "the stock market fell\na puppy plays in the park\nrain")
            page.fill("#embed-query", "a dog running on grass")
            page.click("#embed-search")
            expect(page.locator("#embed-status")).to_have_text("3 lines ranked")
            first = page.locator("#embed-results li .line").first
            expect(first).to_have_text("a puppy plays in the park")
            browser.close()
    finally:
        scheduler.engine.decode = decode
