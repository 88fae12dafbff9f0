"""Settings on the command line: the options come from the config dataclasses (one source of
names, defaults and help), are checked as soon as they are parsed (one line naming the valid
range, exit 2, before any data is read or model loaded), and `generate` says what it did to a
prompt too long for the model."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from lmarch.cli.main import build_parser
from lmarch.cli.options import option_fields, option_name
from lmarch.generation import GenerationConfig, SamplingConfig, generate
from lmarch.models.registry import FAMILIES
from lmarch.settings import field_help
from lmarch.tasks.classify import ClassifyConfig
from lmarch.tokenizers.char import CharTokenizer
from lmarch.train.config import TrainConfig
from lmarch.weights.checkpoint import load_run


def _subparser(*names: str):
    parser = build_parser()
    for name in names:
        action = next(a for a in parser._actions if a.dest.endswith("command"))
        parser = action.choices[name]
    return parser


def _options(parser) -> dict[str, object]:
    return {s: a for a in parser._actions for s in a.option_strings}


def test_train_options_are_the_config_fields() -> None:
    """Every scalar field of TrainConfig and of each family's config is a `train` option,
    unset by default (the preset's or the resumed run's value stands), with the field's help."""
    options = _options(_subparser("train"))
    for f, _ in option_fields(TrainConfig):
        action = options[option_name(f.name)]
        assert action.default is None and field_help(TrainConfig, f) in action.help
    for family in FAMILIES.values():
        for f, _ in option_fields(family.config_cls):
            assert options[option_name(f.name)].default is None
    assert "--n-kv-head" in options and "--max-iters" in options and "--learning-rate" in options


def test_sample_and_generate_share_their_options() -> None:
    """sample and generate take the same decoding options (SamplingConfig + GenerationConfig
    fields), --json and --quant; only their defaults differ where the command asks for it."""
    sample, generate_ = _options(_subparser("sample")), _options(_subparser("generate"))
    for cls in (SamplingConfig, GenerationConfig):
        for f, _ in option_fields(cls, exclude=["ignore_eos"]):
            name = option_name(f.name)
            assert name in sample and name in generate_
            assert sample[name].help.split(" (default")[0] == field_help(cls, f)
    for name in ("--json", "--quant", "--compile", "--stop", "--seed", "--top-p"):
        assert name in sample and name in generate_
    assert generate_["--temperature"].default == 0.0 and sample["--temperature"].default == 0.8
    assert generate_["--quant"].choices == sample["--quant"].choices


def test_classify_train_options_are_classify_config() -> None:
    """`classify train` parses into a ClassifyConfig whose every field has its option (and
    --lr stays an alias of --learning-rate)."""
    parser = build_parser()
    args = parser.parse_args(
        ["classify", "train", "--data", "d.jsonl", "--out", "o", "--lr", "1e-3",
         "--warmup-fraction", "0.2", "--epochs", "2"]
    )  # fmt: skip
    from lmarch.cli.options import config_from_args

    config = config_from_args(ClassifyConfig, args, args.classify_keys)
    expected = ClassifyConfig(learning_rate=1e-3, warmup_fraction=0.2, epochs=2.0)
    assert config == expected
    assert set(args.classify_keys) == {f.name for f in dataclasses.fields(ClassifyConfig)}


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        (["--set", "n_layer=-1"], "n_layer must be an integer >= 1, got -1"),
        (["--set", "n_layer=0"], "n_layer must be an integer >= 1, got 0"),
        (["--set", "n_head=3"], "n_embd (128) must be a multiple of n_head (3)"),
        (["--set", "dropout=2"], "dropout must be in [0, 1), got 2.0"),
        (["--set", "block_size=0"], "block_size must be an integer >= 1, got 0"),
        (["--n-layer", "0"], "n_layer must be an integer >= 1, got 0"),
        (["--learning-rate", "-1"], "learning_rate must be a number > 0"),
        (["--beta2", "1.5"], "beta2 must be in [0, 1), got 1.5"),
        (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
        (["--val-fraction", "1"], "val_fraction must be in (0, 1)"),
        (["--dtype", "float16"], "dtype must be one of ['float32', 'bfloat16']"),
        (["--n-layer", "two"], "invalid int value: 'two'"),
        (["--preset", "bigram-char", "--block-size", "0"], "BigramConfig.block_size must be"),
    ],
)
def test_bad_train_settings_are_refused_before_any_work(settings, needle, tmp_path, cli) -> None:
    """One line naming the field and its valid range, exit 2 — and refused before the data is
    read (the --data path does not exist) or the run folder made."""
    argv = ["train", "--preset", "gpt-char-tiny", "--data", tmp_path / "absent.txt"]
    assert needle in cli.error(*argv, "--out", tmp_path / "run", *settings)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("preset", "needle"),
    [
        ("llama3-8b", "llama3-8b is shape only"),
        ("smollm2-135m", "smollm2-135m holds real pretrained weights"),
    ],
)
def test_presets_not_trained_here_are_refused(preset, needle, tmp_path, cli) -> None:
    assert needle in cli.error("train", "--preset", preset, "--out", tmp_path / "r")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "{run}", ""], "the prompt is empty"),
        (["generate", "{run}", "hi", "--max-new-tokens", "-1"], "max_new_tokens must be an integer >= 0, got -1"),
        (["sample", "{run}", "--max-new-tokens", "-1"], "max_new_tokens must be an integer >= 0"),
        (["generate", "{run}", "hi", "--top-p", "1.5"], "top_p must lie in (0, 1]"),
        (["generate", "{run}", "hi", "--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["generate", "{run}", "hi", "--stop", ""], "stop strings must be non-empty"),
        (["generate", "{bigger}", "hi €"], "the tokenizer has 63 ids but the model's vocabulary holds only 59"),
    ],
)  # fmt: skip
def test_bad_generate_input_is_one_line(argv, needle, tiny_run, tmp_path, cli) -> None:
    """Empty prompt, negative --max-new-tokens, sampling settings out of range, a tokenizer whose
    ids the model does not have (here a tokenizer of 4 more characters than the model's 59)."""
    bigger = tmp_path / "bigger"
    shutil.copytree(tiny_run, bigger)
    text = (tiny_run.parent / "tiny.txt").read_text(encoding="utf-8") + "éàü€"
    CharTokenizer.from_text(text).save(bigger / "tokenizer.json")
    argv = [a.format(run=tiny_run, bigger=bigger) for a in argv]
    assert needle in cli.error(*argv)


def test_long_prompt_is_cut_with_a_notice(tiny_run, cli) -> None:
    """A prompt of 100 tokens for a 32-token context and 8 new tokens: one notice on stderr,
    `prompt_tokens` 24 (room is left for the 8), and the tokens are the greedy continuation of
    the prompt's last 24 tokens."""
    prompt = (tiny_run.parent / "tiny.txt").read_text(encoding="utf-8")[:100]
    code, out, err = cli("generate", tiny_run, prompt, "--max-new-tokens", "8", "--json")
    assert code == 0
    notices = [line for line in err.splitlines() if "notice" in line]
    assert notices == [
        "lmarch generate: notice: the prompt has 100 tokens, more than the model's context of "
        "32: only its last 24 tokens are kept, leaving room for 8 new"
    ]
    import json

    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["prompt_tokens"] == 24
    model, tok, _ = load_run(tiny_run)
    expected = generate(model, torch.tensor([tok.encode(prompt)[-24:]]), 8)[0, 24:].tolist()
    assert summary["token_ids"] == expected


def test_stream_text_refuses_ids_beyond_the_vocabulary(tiny_run) -> None:
    """Where no loader checked the pair, decoding does: an id the model's embedding lacks is
    refused by name instead of failing inside the embedding lookup."""
    from lmarch.errors import LmarchError
    from lmarch.generation import stream_text

    model, tok, _ = load_run(tiny_run)
    text = (tiny_run.parent / "tiny.txt").read_text(encoding="utf-8") + "\u20ac"
    bigger = CharTokenizer.from_text(text)
    with pytest.raises(LmarchError, match="gave token id 59, but the model has only 59 ids"):
        list(stream_text(model, bigger, "a\u20ac", 4))


def test_library_configs_refuse_what_the_command_refuses() -> None:
    """The same checks guard the library: a ValueError-free LmarchError naming the range."""
    from lmarch.errors import LmarchError

    with pytest.raises(LmarchError, match="max_new_tokens must be an integer >= 0"):
        GenerationConfig(max_new_tokens=-1)
    with pytest.raises(LmarchError, match="warmup_iters must be an integer >= 0"):
        TrainConfig(warmup_iters=-5)
    with pytest.raises(LmarchError, match="lr_decay_iters must be an integer >= 1"):
        TrainConfig(lr_decay_iters=0)


def test_config_value_errors_are_one_line_and_bugs_are_not(cli, monkeypatch) -> None:
    """A ValueError raised by a config's __post_init__ is the user's input: one line, exit 2. A
    ValueError from anywhere else is a bug and keeps its traceback."""
    from lmarch.cli import main as cli_main

    @dataclasses.dataclass
    class Shape:
        n_head: int

        def __post_init__(self) -> None:
            if self.n_head < 1:
                raise ValueError(f"n_head must be >= 1, got {self.n_head}")

    monkeypatch.setitem(cli_main.COMMANDS, "presets", lambda args: Shape(0))
    assert cli.error("presets") == "lmarch presets: error: n_head must be >= 1, got 0"

    def bug(args):
        raise ValueError("a bug")

    monkeypatch.setitem(cli_main.COMMANDS, "presets", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli_main.main(["presets"])


def test_sample_json_is_generate_json(tiny_run, cli) -> None:
    """`sample --json` prints the summary `generate --json` does, for the same decoding."""
    args = ["--temperature", "0", "--max-new-tokens", "6"]
    sampled = cli.json("sample", tiny_run, "--prompt", "ROMEO:", *args)
    generated = cli.json("generate", tiny_run, "ROMEO:", *args)
    assert sampled["prompt_tokens"] == generated["prompt_tokens"] == 6
    assert sampled["token_ids"] == generated["token_ids"] and len(sampled["token_ids"]) == 6
    model, tok, _ = load_run(tiny_run)
    assert sampled["text"] == tok.decode(sampled["token_ids"])
