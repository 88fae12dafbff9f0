"""Beam search: token-for-token equal to transformers' ``generate(num_beams=4)`` on GPT-2 and
LLaMA, and on T5, BART and Marian through the encoder-decoder step interface (scores within
1e-4); exact beams on a hand-built model whose probabilities are known; the command line; the
refusals."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.generation import GenerationConfig, SamplingConfig
from lmarch.generation.beam import (
    BeamSearchConfig,
    CausalBeamDecoder,
    beam_search,
    beam_search_prompts,
    check_beam_sampling,
)
from lmarch.generation.seq2seq import seq2seq_beam_search
from lmarch.models.gpt import GPT, GPTConfig
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.nn.cache import KVCache
from lmarch.tokenizers import ByteLevelBPETokenizer
from lmarch.weights.hf_bart import load_hf_bart
from lmarch.weights.hf_gpt2 import save_hf_gpt2
from lmarch.weights.hf_llama import save_hf_llama
from lmarch.weights.hf_t5 import load_hf_t5

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # the tiny configs' default bos/eos ids (50256) lie outside their 50-token vocabularies
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

TOL = 1e-4
MAX_NEW = 10
GPT2_SCALE = 3.0
PAD = 47
PROMPTS = [[3, 7, 9, 11, 2], [5, 6], [8, 1, 4, 4]]  # three lengths: left-padded on HF's side
# an end token each model often picks after a few tokens, so that beams end at different lengths
EOS = {"gpt2": 37, "llama": 14}


def _pair(family: str, folder) -> tuple[nn.Module, nn.Module]:  # type: ignore[no-untyped-def]
    """An lmarch model and the transformers model with the same weights, both float64.

    Random tiny models give near-uniform next-token distributions, on which beams would be
    ranked by float noise; the weight matrices are scaled up so the distributions are peaked
    and the beams' scores lie far apart."""
    torch.manual_seed(0)
    if family == "gpt2":
        ours = GPT(GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32))
        scale, save, hf_cls = GPT2_SCALE, save_hf_gpt2, transformers.GPT2LMHeadModel
    else:
        ours = Llama(
            LlamaConfig(
                vocab_size=50, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                intermediate_size=48,
            )
        )  # fmt: skip
        scale, save, hf_cls = 6.0, save_hf_llama, transformers.LlamaForCausalLM
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    ours = ours.double().eval()
    save(ours, folder)
    return ours, hf_cls.from_pretrained(folder, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, tuple[nn.Module, nn.Module]]:  # type: ignore[no-untyped-def]
    return {f: _pair(f, tmp_path_factory.mktemp(f)) for f in ("gpt2", "llama")}


def _hf_beams(hf: nn.Module, prompts: list[list[int]], **kw) -> tuple[list[list[int]], Tensor]:
    """transformers' beams for ``prompts`` as one left-padded batch: the generated part of each
    returned row (end token and filling included) and ``sequences_scores``."""
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (ids != PAD).long()  # PAD occurs in no prompt
    out = hf.generate(
        ids, attention_mask=mask, num_beams=4, do_sample=False, pad_token_id=PAD,
        max_new_tokens=MAX_NEW, output_scores=True, return_dict_in_generate=True, **kw,
    )  # fmt: skip
    return out.sequences[:, width:].tolist(), out.sequences_scores


CASES = [
    # (settings, whether HF runs the prompts as one left-padded batch)
    (dict(length_penalty=1.0, early_stopping=False), True),
    (dict(length_penalty=2.0, early_stopping=True, min_new_tokens=4, num_return_sequences=3), True),
    # HF counts the left padding in its n-grams, so with no_repeat_ngram_size it runs each
    # prompt alone (lmarch never pads; see beam_search_prompts)
    (dict(length_penalty=-0.5, early_stopping="never", no_repeat_ngram_size=2), False),
    (dict(length_penalty=0.7, early_stopping="never", forced_eos_token_id=0, extra_eos=3), True),
    (dict(length_penalty=0.0, no_repeat_ngram_size=3, num_return_sequences=4), False),
]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_beams_equal_transformers_generate(pairs, family: str, case: int) -> None:
    """Prompts of three lengths, 4 beams, 10 new tokens: every returned sequence equals
    transformers' token for token (the filling after an end token too) and its score
    ``sequences_scores`` within 1e-4."""
    ours, hf = pairs[family]
    settings, batched = CASES[case]
    settings = dict(settings)
    eos = [EOS[family]] + ([settings.pop("extra_eos")] if "extra_eos" in settings else [])
    r = settings.get("num_return_sequences", 1)
    config = BeamSearchConfig(
        num_beams=4, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD, **settings
    )
    found = beam_search_prompts(ours, PROMPTS, config)
    kw = dict(settings, eos_token_id=eos)
    if batched:
        rows, scores = _hf_beams(hf, PROMPTS, **kw)
    else:
        runs = [_hf_beams(hf, [p], **kw) for p in PROMPTS]
        rows = [row for run in runs for row in run[0]]
        scores = torch.cat([run[1] for run in runs])
    lengths = []
    for i, hyps in enumerate(found):
        assert len(hyps) == r
        for j, hyp in enumerate(hyps):
            row = rows[i * r + j]
            ids = list(hyp.token_ids)
            assert ids + [PAD] * (len(row) - len(ids)) == row
            assert abs(hyp.score - float(scores[i * r + j])) <= TOL
            lengths.append(len(ids))
    # some beams end early (the end token), some run to the limit: both ways of finishing
    assert min(lengths) < MAX_NEW <= max(lengths) or r == 1 and min(lengths) < MAX_NEW


def test_batched_search_equals_one_prompt_at_a_time(pairs) -> None:
    """Prompts of equal length searched as one batch (rows = prompts x beams) give what each
    gives alone: the batch's rows and their cache reorders stay apart."""
    ours, _ = pairs["llama"]
    config = BeamSearchConfig(num_beams=3, max_new_tokens=8, eos_token_id=14, length_penalty=1.5)
    prompts = [[3, 7, 9], [5, 6, 2], [8, 1, 4]]
    together = beam_search_prompts(ours, prompts, config)
    assert together == [beam_search_prompts(ours, [p], config)[0] for p in prompts]
    assert len({h[0].token_ids for h in together}) == 3


def test_filling_after_the_end_token_follows_transformers(pairs) -> None:
    """Sequences that ended early are filled with the pad id, or with the end id when the pad
    id is 0 (transformers tests it for truth): whole outputs equal generate's either way."""
    ours, hf = pairs["llama"]
    prompt = [[8, 1, 4, 4]]
    for pad in (0, 5):
        config = BeamSearchConfig(
            num_beams=4, max_new_tokens=MAX_NEW, eos_token_id=14, pad_token_id=pad,
            num_return_sequences=4,
        )  # fmt: skip
        decoder = CausalBeamDecoder(ours, 4, 4 + MAX_NEW - 1)
        got = beam_search(decoder, torch.tensor(prompt), config)
        want = hf.generate(
            torch.tensor(prompt), attention_mask=torch.ones(1, 4, dtype=torch.long), num_beams=4,
            num_return_sequences=4, do_sample=False, pad_token_id=pad, eos_token_id=14,
            max_new_tokens=MAX_NEW,
        )  # fmt: skip
        assert got.sequences.tolist() == want.tolist()
        assert got.lengths.tolist() == [4, 6, 1, 8]  # the fill is there to compare


_SEQ2SEQ_SHAPE = dict(
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40,
)  # fmt: skip
SEQ2SEQ = {
    # family: (matrix gain, forced first token, an end token the model reaches early)
    "t5": (2.0, None, 48),
    "bart": (6.0, 0, 4),  # bart-large-cnn forces its first token
    "marian": (6.0, None, 48),  # its config forces the end token at the last step
}


def _seq2seq_pair(family: str, folder) -> tuple[nn.Module, nn.Module]:  # type: ignore[no-untyped-def]
    """A random transformers encoder-decoder and lmarch's model read from its folder, both
    float64; every weight matrix but Marian's fixed sinusoids scaled up (as in _pair)."""
    torch.manual_seed(0)
    if family == "t5":
        config = transformers.T5Config(
            vocab_size=60, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            dropout_rate=0.0, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
        )  # fmt: skip
        hf = transformers.T5ForConditionalGeneration(config)
    elif family == "bart":
        hf = transformers.BartForConditionalGeneration(
            transformers.BartConfig(vocab_size=60, **_SEQ2SEQ_SHAPE)
        )
    else:
        config = transformers.MarianConfig(
            vocab_size=60, pad_token_id=59, decoder_start_token_id=59, eos_token_id=0,
            forced_eos_token_id=0, scale_embedding=True, activation_function="swish",
            **_SEQ2SEQ_SHAPE,
        )  # fmt: skip
        hf = transformers.MarianMTModel(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2 and "embed_positions" not in name:
                p.mul_(SEQ2SEQ[family][0])
    hf.save_pretrained(folder)
    ours = (load_hf_t5 if family == "t5" else load_hf_bart)(folder)
    return ours.double().eval(), hf.double().eval()


@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
def test_encoder_decoder_beams_equal_transformers_generate(family: str, tmp_path) -> None:
    """T5, BART and Marian through seq2seq_beam_search (sources of three lengths, padded;
    encoded once, repeated over the beams): whole outputs equal generate's and the scores its
    sequences_scores within 1e-4, with forced first / last tokens where the family has them."""
    ours, hf = _seq2seq_pair(family, tmp_path)
    _, forced_bos, eos = SEQ2SEQ[family]
    pad = hf.generation_config.pad_token_id
    forced_eos = hf.generation_config.forced_eos_token_id
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    sources = torch.randint(3, 58, (3, 9), generator=g).masked_fill(mask == 0, pad)
    lengths = []
    for settings in (
        dict(length_penalty=1.5, early_stopping=False, no_repeat_ngram_size=2),
        dict(length_penalty=0.5, early_stopping="never", min_new_tokens=3),
    ):
        settings["num_return_sequences"] = 3
        config = BeamSearchConfig(
            num_beams=4, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=pad,
            forced_bos_token_id=forced_bos, forced_eos_token_id=forced_eos, **settings,
        )  # fmt: skip
        got = seq2seq_beam_search(ours, sources, config, attention_mask=mask)
        want = hf.generate(
            input_ids=sources, attention_mask=mask, num_beams=4, max_new_tokens=MAX_NEW,
            do_sample=False, eos_token_id=eos, forced_bos_token_id=forced_bos,
            output_scores=True, return_dict_in_generate=True, **settings,
        )  # fmt: skip
        assert got.sequences.tolist() == want.sequences.tolist()
        assert (got.scores - want.sequences_scores).abs().max().item() <= TOL
        lengths += got.lengths.tolist()
    assert min(lengths) < MAX_NEW  # some beams ended at the end token
    if forced_bos is not None:
        assert set(got.sequences[:, 1].tolist()) == {forced_bos}


class PositionModel:
    """A :class:`~lmarch.generation.beam.BeamDecoder` whose next-token probabilities depend on
    the position only (row p of ``table`` after position p), so every beam can be worked out by
    hand. Tokens: 0 = end, 1 = a, 2 = b, 3 = start."""

    table = [
        {1: 0.45, 0: 0.40, 2: 0.15},
        {0: 0.50, 1: 0.30, 2: 0.20},
        {0: 0.90, 1: 0.05, 2: 0.05},
    ]

    def __init__(self) -> None:
        self.steps = 0

    def step(self, input_ids: Tensor, start: int) -> Tensor:
        self.steps += 1
        probs = torch.zeros(4, dtype=torch.float64)
        for token, p in self.table[start + input_ids.shape[1] - 1].items():
            probs[token] = p
        return probs.log().expand(input_ids.shape[0], 4)

    def reorder_cache(self, indices: Tensor) -> None:
        pass


L = {k: math.log(v) for k, v in dict(a1=0.45, e1=0.4, e2=0.5, a2=0.3, b2=0.2, e3=0.9).items()}
E_ = L["e1"]  # "end" at once
AE = L["a1"] + L["e2"]  # "a end"
AAE = L["a1"] + L["a2"] + L["e3"]
ABE = L["a1"] + L["b2"] + L["e3"]
TOY_CASES = [
    # length penalty, early stopping -> expected (new tokens, score) best first, decoder steps
    # lp 0: the plain sum; the one-token "end" beats everything
    (0.0, False, [((0,), E_), ((1, 0), AE)], 2),
    # lp 1: "a end" first; at 2 tokens the running "a a" (-2.00 / 2) cannot beat the worst
    # finished (-0.92) by the current-length heuristic, so the search stops
    (1.0, False, [((1, 0), AE / 2), ((0,), E_)], 2),
    (1.0, True, [((1, 0), AE / 2), ((0,), E_)], 2),
    # "never": at its best length (3) "a a" could still win (-2.00 / 3 > -0.92), and does
    (1.0, "never", [((1, 1, 0), AAE / 3), ((1, 0), AE / 2)], 3),
    # lp 2: two beams finished after 2 tokens; True stops there, False goes on since
    # -2.00 / 4 > -0.92, and the 3-token beams win
    (2.0, True, [((1, 0), AE / 4), ((0,), E_)], 2),
    (2.0, False, [((1, 1, 0), AAE / 9), ((1, 2, 0), ABE / 9)], 3),
]


@pytest.mark.parametrize("lp, early, expected, steps", TOY_CASES)
def test_length_penalty_and_early_stopping_on_known_probabilities(
    lp: float, early: bool | str, expected: list, steps: int
) -> None:
    """Two beams over the hand-built model: the finished list, its scores and when the search
    stops, exactly as worked out in the comments above."""
    model = PositionModel()
    config = BeamSearchConfig(
        num_beams=2, max_new_tokens=3, eos_token_id=0, length_penalty=lp, early_stopping=early,
        num_return_sequences=2,
    )  # fmt: skip
    out = beam_search(model, torch.tensor([[3]]), config)
    got = [
        (tuple(out.sequences[i, 1 : 1 + int(out.lengths[i])].tolist()), float(out.scores[i]))
        for i in range(2)
    ]
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert [g[1] for g in got] == pytest.approx([e[1] for e in expected], abs=1e-6)
    assert model.steps == steps
    width = 1 + max(len(e[0]) for e in expected)
    assert out.sequences.shape == (2, width)
    # shorter sequences are filled with the end token (no pad id given)
    assert out.sequences[1, 1 + int(out.lengths[1]) :].eq(0).all()


class Seq2SeqToy(nn.Module):
    """An 'encoder-decoder' with the step interface of lmarch.generation.seq2seq: its decoder
    is :class:`PositionModel`, and it records what it was asked for."""

    decoder_start_token_id = 3

    def __init__(self) -> None:
        super().__init__()
        self.asked: dict = {}
        self.decoder = PositionModel()

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        self.asked["sources"] = input_ids
        return input_ids.float()[..., None]

    def make_cache(self, memory: Tensor, attention_mask: Tensor | None, max_len: int):  # type: ignore[no-untyped-def]
        self.asked.update(rows=memory.shape[0], max_len=max_len)
        return SimpleNamespace(self_attention=SimpleNamespace(reorder=lambda *a: None))

    def decode_step(self, input_ids: Tensor, cache, start: int) -> Tensor:  # type: ignore[no-untyped-def]
        return self.decoder.step(input_ids, start)[:, None]


def test_encoder_decoder_entry_forced_bos() -> None:
    """seq2seq_beam_search starts each decoder at its start token and asks the model for a
    decoder over the sources; the forced first token (BART's forced_bos_token_id) is taken with
    probability 1, the rest worked out by hand: "b end" (ln .5 / 2), then "b a end"."""
    model = Seq2SeqToy()
    sources = torch.tensor([[5, 6, 7], [8, 9, 9]])
    config = BeamSearchConfig(
        num_beams=2, max_new_tokens=3, eos_token_id=0, forced_bos_token_id=2,
        num_return_sequences=2,
    )  # fmt: skip
    out = seq2seq_beam_search(model, sources, config)
    assert model.asked["rows"] == 2 * 2 and model.asked["max_len"] == 3
    assert torch.equal(model.asked["sources"], sources)
    expected = torch.tensor([[3, 2, 0, 0], [3, 2, 1, 0]])
    assert torch.equal(out.sequences, torch.cat([expected, expected]))
    score = [math.log(0.5) / 2, (math.log(0.3) + math.log(0.9)) / 3]
    assert out.scores.tolist() == pytest.approx(score * 2, abs=1e-6)
    with pytest.raises(LmarchError, match="not an encoder-decoder model"):
        seq2seq_beam_search(nn.Linear(2, 2), sources, config)


def test_kv_cache_reorder() -> None:
    """Row i becomes old row indices[i] over the first ``length`` positions; later ones stay."""
    cache = KVCache(n_layers=2, batch_size=3, n_kv_heads=1, max_len=4, head_dim=2)
    cache.keys.copy_(torch.arange(cache.keys.numel(), dtype=torch.float32).view_as(cache.keys))
    cache.values.copy_(-cache.keys)
    before = cache.keys.clone()
    cache.reorder(torch.tensor([2, 2, 0]), length=3)
    assert torch.equal(cache.keys[:, :, :, :3], before[:, [2, 2, 0], :, :3])
    assert torch.equal(cache.keys[:, :, :, 3:], before[:, :, :, 3:])
    assert torch.equal(cache.values, -cache.keys)
    k, _ = cache.update(1, torch.ones(3, 1, 1, 2), torch.ones(3, 1, 1, 2), 3)  # views still valid
    assert torch.equal(k[:, :, :3], before[1][[2, 2, 0], :, :3])


def test_refusals() -> None:
    """Settings beam search cannot honour are refused by name, in the library and the config."""
    with pytest.raises(LmarchError, match=r"num_return_sequences \(5\) cannot exceed num_beams"):
        BeamSearchConfig(num_beams=4, num_return_sequences=5)
    with pytest.raises(LmarchError, match="early_stopping must be True, False or 'never'"):
        BeamSearchConfig(early_stopping="sometimes")
    with pytest.raises(LmarchError, match="length_penalty must be a finite number, got nan"):
        BeamSearchConfig(length_penalty=float("nan"))
    with pytest.raises(LmarchError, match="num_beams must be an integer >= 1"):
        BeamSearchConfig(num_beams=0)
    with pytest.raises(LmarchError, match="beam search does not sample: temperature 0.8, top_k 5"):
        check_beam_sampling(SamplingConfig(temperature=0.8, top_k=5))
    check_beam_sampling(SamplingConfig(temperature=0.0))  # greedy settings are fine
    with pytest.raises(LmarchError, match="length_penalty, min_new_tokens apply to beam search"):
        GenerationConfig(length_penalty=2.0, min_new_tokens=3)
    with pytest.raises(LmarchError, match="early_stopping must be true, false or never"):
        GenerationConfig(num_beams=2, early_stopping="maybe")
    assert GenerationConfig(num_beams=3, early_stopping=True).beam_config([7]).early_stopping
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(LmarchError, match="a prompt of 6 tokens plus 5 new ones exceeds"):
        beam_search_prompts(model, [[1] * 6], BeamSearchConfig(max_new_tokens=5))


@pytest.fixture
def hf_gpt2_folder(tmp_path, shakespeare_text):  # type: ignore[no-untyped-def]
    """A GPT-2 folder in the Hugging Face layout with a byte-level BPE tokenizer.json, its
    weights scaled up so that beams separate."""
    tok = ByteLevelBPETokenizer.train(shakespeare_text[:5000], vocab_size=300)
    tok.to_hf_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    save_hf_gpt2(model, tmp_path)
    return tmp_path, tok


def test_generate_command_with_beams(hf_gpt2_folder, cli) -> None:
    """`lmarch generate FOLDER PROMPT --num-beams 4 --num-return-sequences 2 --json` gives
    transformers' beams (ids and scores); sampling options with beams are one line, exit 2."""
    folder, tok = hf_gpt2_folder
    code, out, err = cli("generate", str(folder), "ROMEO:", "--num-beams", "4", "--top-p", "0.9")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "beam search does not sample: top_p 0.9" in err
    code, _, err = cli("generate", str(folder), "x", "--num-beams", "2", "--early-stopping", "x")
    assert code == 2 and "early_stopping must be true, false or never" in err
    code, out, _ = cli(
        "generate", str(folder), "ROMEO:", "--num-beams", "4", "--num-return-sequences", "2",
        "--length-penalty", "1.5", "--no-repeat-ngram-size", "3", "--max-new-tokens", "12",
        "--json",
    )  # fmt: skip
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    prompt = torch.tensor([tok.encode("ROMEO:")])
    eos = tok.encode("<|endoftext|>")
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), num_beams=4, num_return_sequences=2,
        length_penalty=1.5, no_repeat_ngram_size=3, max_new_tokens=12, do_sample=False,
        eos_token_id=eos, pad_token_id=eos[0], output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    assert len(summary["beams"]) == 2 and len(eos) == 1
    for beam, row, score in zip(summary["beams"], expected.sequences, expected.sequences_scores):
        new = row[prompt.shape[1] :].tolist()
        n = len(beam["token_ids"])
        assert beam["token_ids"] == new[:n] and new[n:] == eos * (len(new) - n)
        assert abs(beam["score"] - float(score)) <= TOL
        assert beam["text"] == tok.decode([t for t in beam["token_ids"] if t not in eos])
    assert summary["text"] == summary["beams"][0]["text"]
