"""``lmarch.load`` opens image-text models: a ``lmarch clip train`` run, a captioner run, a
Flamingo run (each trained one step, tiny) and a Hugging Face CLIP folder written by
transformers. The loaded models compute bit for bit what the trained models held in memory at
the end of training (and what the task loaders, now wrappers over ``lmarch.load``, give); the
HF folder matches transformers' features (1e-5); the wrong use is refused in one line naming
the command that takes the model."""

from __future__ import annotations

import pytest
import torch
import transformers

import lmarch
from lmarch.data.shapes import shapes_dataset, to_pixels
from lmarch.errors import LmarchError
from lmarch.tasks import caption, clip, flamingo

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(batch_size=4, n_embd=16, n_layer=1, n_head=2, image_size=16, patch_size=8)


def _recording(cls: type, made: list) -> type:
    """``cls`` as a subclass that keeps every instance the training code builds."""

    class Recorded(cls):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    return Recorded


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One training step of each (about 1 s together): run folder -> the task's in-memory
    object at the end of training (ClipModel, Captioner, FlamingoQA)."""
    root = tmp_path_factory.mktemp("vision")
    trained = {}
    with pytest.MonkeyPatch.context() as mp:
        for module, cls, train, config in (
            (clip, "ClipModel", clip.train_clip, clip.ClipTrainConfig(steps=1, **TINY)),
            (caption, "Captioner", caption.train_captioner,
             caption.CaptionTrainConfig(steps=1, **TINY)),
            (flamingo, "FlamingoQA", flamingo.train_flamingo,
             flamingo.FlamingoTrainConfig(clip_steps=1, lm_steps=1, steps=1, n_latents=2, **TINY)),
        ):  # fmt: skip
            made: list = []
            mp.setattr(module, cls, _recording(getattr(module, cls), made))
            out = root / cls.lower()
            train(config, out)
            trained[module.OBJECTIVE] = (out, made[-1])
    return trained


def _batch(size: int):
    examples = shapes_dataset(4, 1, "test", 2, size)
    return to_pixels(examples), [e.caption for e in examples]


def _model(run) -> torch.nn.Module:
    """The module of a task object (Flamingo's three parts as the one lmarch.load builds)."""
    from lmarch.peft.flamingo import FlamingoLM

    return run.model if hasattr(run, "model") else FlamingoLM(run.lm, run.vision, run.adapter)


def _outputs(objective: str, trained, model, pixels, captions) -> list[torch.Tensor]:
    """What each kind of model computes on images and captions (token ids from the trained
    run's own tokenizer)."""
    if objective == "contrastive":
        ids, mask = trained.encode_texts(captions)
        return [model.image_features(pixels), model.text_features(ids, mask), model.logit_scale]
    if objective == "caption":
        return [model(pixels, trained.encode_captions(captions)[0])]
    ids = trained.encode(captions)[0]
    return [model(ids, pixels), model(ids, None)]  # with the image, and the frozen LM alone


@torch.no_grad()
@pytest.mark.parametrize(
    ("objective", "family", "load_task"),
    [("contrastive", "clip", clip.load_clip), ("caption", "blip", caption.load_captioner),
     ("flamingo", "gpt", flamingo.load_flamingo)],
)  # fmt: skip
def test_runs_load_bit_identical(runs, objective, family, load_task) -> None:
    out, trained = runs[objective]
    loaded = lmarch.load(out)
    assert (loaded.family, loaded.objective, loaded.quant) == (family, objective, "none")
    assert loaded.preprocessor == trained.preprocessor == clip.shapes_preprocessor(16)
    pixels, captions = _batch(16)
    expected = _outputs(objective, trained, _model(trained).eval(), pixels, captions)
    for model in (loaded.model, _model(load_task(out))):
        got = _outputs(objective, trained, model, pixels, captions)
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    assert loaded.tokenizer.encode(captions[0]) == trained.tokenizer.encode(captions[0])


def test_wrong_use_names_the_right_command(runs) -> None:
    out = runs["contrastive"][0]
    with pytest.raises(LmarchError) as err:
        lmarch.load(out).require("causal-lm", "generate")
    assert str(err.value) == (
        f"{out} holds a CLIP model (clip); generate needs a causal LM "
        f"(hint: try lmarch clip zero-shot {out} --image FILE)"
    )
    with pytest.raises(LmarchError, match=r"needs a captioner \(lmarch caption train\) "
                       r"\(hint: try lmarch flamingo ask .* --question TEXT\)$"):  # fmt: skip
        caption.load_captioner(runs["flamingo"][0])
    with pytest.raises(LmarchError, match="a CLIP model .* loads in float .*, not int8$"):
        lmarch.load(out, quant="int8")


def test_cli_refuses_a_clip_run_in_generate(runs, cli) -> None:
    out = runs["contrastive"][0]
    assert cli.error("generate", out, "hello").endswith(
        f"holds a CLIP model (clip); generate needs a causal LM "
        f"(hint: try lmarch clip zero-shot {out} --image FILE)"
    )


@torch.no_grad()
def test_hf_clip_folder_loads_as_transformers_computes(tmp_path) -> None:
    """A CLIP folder written by transformers (random, tiny; the shapes' tokenizer beside it):
    lmarch.load's scores and unit image and text embeddings equal CLIPModel's (1e-5)."""
    tokenizer = clip.shapes_tokenizer()
    eos = tokenizer.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=40,
                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16,
                         eos_token_id=eos, bos_token_id=eos - 1, pad_token_id=eos),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=40,
                           num_hidden_layers=1, num_attention_heads=4),
        projection_dim=16,
    )  # fmt: skip
    theirs = transformers.CLIPModel(config).eval()
    theirs.save_pretrained(tmp_path)
    tokenizer.to_hf_tokenizer().save(str(tmp_path / "tokenizer.json"))  # the library's format
    loaded = lmarch.load(tmp_path)
    assert (loaded.name, loaded.family, loaded.objective) == (str(tmp_path), "clip", "contrastive")
    pixels, captions = _batch(16)
    batch = tokenizer.encode_batch(captions, max_length=16)
    ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    ref = theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    got = loaded.model(ids, pixels, mask)
    torch.testing.assert_close(got.logits_per_image, ref.logits_per_image, atol=1e-5, rtol=0)
    unit = torch.nn.functional.normalize
    for mine, hf in ((loaded.model.image_features(pixels), ref.image_embeds),
                     (loaded.model.text_features(ids, mask), ref.text_embeds)):  # fmt: skip
        torch.testing.assert_close(unit(mine, dim=-1), hf, atol=1e-5, rtol=0)
    from lmarch.analysis.inspect import inspect_model

    report = inspect_model(str(tmp_path))
    assert report.description == "Hugging Face folder (contrastive)"
    assert report.params == sum(p.numel() for p in theirs.parameters())


def test_inspect_counts_the_parts_of_image_text_runs(runs, cli) -> None:
    """``lmarch inspect`` on the three runs: parameters as loaded; FLOPs by part as counted by
    hand (CLIP's image tower: 5 tokens of width 16 after a 4-patch embedding) or by the GPT
    count of :mod:`lmarch.analysis.flops` (Flamingo's frozen LM alone)."""
    from lmarch.analysis.flops import count_forward_flops
    from lmarch.analysis.inspect import inspect_model, render

    clip_run = str(runs["contrastive"][0])
    report = inspect_model(clip_run)
    assert report.params == sum(p.numel() for p in lmarch.load(clip_run).model.parameters())
    d, n, patches = 16, 5, 4  # width, tokens (class + patches), patches of 3 x 8 x 8
    attention = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d  # qkv, QK^T and AV, out
    by_hand = 2 * patches * 3 * 64 * d + attention + 2 * 2 * n * d * 2 * d + 2 * d * d
    assert report.flops["image tower + projection (1 image, 5 patches)"] == by_hand
    assert report.seq_len == 16 and report.weights_bytes == 4 * report.params
    fl = inspect_model(str(runs["flamingo"][0]), seq_len=8)
    lm = runs["flamingo"][1].lm.config
    alone = fl.flops["frozen LM alone, per token (8-token text)"]
    assert alone == count_forward_flops(lm, 8).forward_per_token
    text = cli("inspect", runs["caption"][0])[1]
    assert "— blip, run folder (caption)" in text and "image encoder (1 image, 5 patches)" in text
    assert render(fl).splitlines()[0].endswith("— gpt, run folder (flamingo)")
    assert "--seq-len must be in 1..16" in cli.error("inspect", clip_run, "--seq-len", "17")
