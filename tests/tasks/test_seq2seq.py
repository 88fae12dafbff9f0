"""lmarch.tasks.seq2seq: scoring equals sacrebleu / rouge-score, HF BART and Marian folders
decode as transformers does, a tiny model learns the bundled transduction task."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from lmarch.data.seq2seq import Seq2SeqPair
from lmarch.data.shakespeare_tasks import PIG_LATIN_TASK, SPEAKERS_TASK, task_rows
from lmarch.errors import LmarchError, LmarchNotice
from lmarch.tasks import seq2seq

pytestmark = pytest.mark.usefixtures("one_thread")

LINES = [
    "Before we proceed any further, hear me speak.",
    "Speak, speak.",
    "You are all resolved rather to die than to famish?",
]


@pytest.fixture(scope="module")
def bart_folder(tiny_bart_folder: Path) -> Path:
    return tiny_bart_folder


def test_scores_equal_sacrebleu_and_rouge_score() -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps = ["Eforebay eway oceedpray", "Eakspay, eakspay.", "Ouyay areway allway"]
    refs = ["Eforebay eway oceedpray anyway", "Eakspay, eakspay.", "Ouyay areway"]
    got = seq2seq.score_outputs(hyps, refs)
    assert got["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert got["chrf"] == sacrebleu.corpus_chrf(hyps, [refs]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = 100 * sum(scorer.score(r, h)[key].fmeasure for h, r in zip(hyps, refs)) / 3
        assert got[key] == pytest.approx(expected, abs=1e-12)
    assert got["exact_match"] == pytest.approx(100 / 3)
    perfect = seq2seq.score_outputs(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rougeL"] == pytest.approx(100.0)


def test_bart_folder_tokenizer_and_greedy_equal_transformers(bart_folder: Path) -> None:
    from transformers import BartForConditionalGeneration, BartTokenizer

    hf_tok = BartTokenizer(str(bart_folder / "vocab.json"), str(bart_folder / "merges.txt"))
    hf = BartForConditionalGeneration.from_pretrained(bart_folder).eval()
    loaded = seq2seq.load_seq2seq(bart_folder)
    for line in LINES:
        assert seq2seq.source_ids(loaded, line) == hf_tok(line)["input_ids"]
    batch = hf_tok(LINES, return_tensors="pt", padding=True)
    with torch.no_grad():
        ids = hf.generate(**batch, max_new_tokens=12, num_beams=1, do_sample=False)
    expected = hf_tok.batch_decode(ids, skip_special_tokens=True)
    assert seq2seq.translate_texts(loaded, LINES, max_new_tokens=12) == expected
    with torch.no_grad():
        beams = hf.generate(**batch, max_new_tokens=12, num_beams=3, do_sample=False)
    expected_beams = hf_tok.batch_decode(beams, skip_special_tokens=True)
    assert seq2seq.translate_texts(loaded, LINES, num_beams=3, max_new_tokens=12) == (
        expected_beams
    )


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_folders_generation_config_is_applied_as_transformers_does(
    bart_folder: Path, tmp_path: Path, num_beams: int
) -> None:
    """With no decoding flags, a folder's generation_config.json (beams, lengths counted with
    the start token, length penalty, no-repeat n-grams, early stopping, one- and two-token bad
    words, renormalised scores) decodes as transformers' ``generate()`` with no arguments."""
    import shutil

    from transformers import BartForConditionalGeneration, BartTokenizer

    folder = tmp_path / "bart"
    shutil.copytree(bart_folder, folder)
    hf_tok = BartTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    batch = hf_tok(LINES, return_tensors="pt", padding=True)
    base = json.loads((folder / "generation_config.json").read_text())
    settings = dict(
        num_beams=num_beams, max_length=11, min_length=4, length_penalty=2.0,
        no_repeat_ngram_size=2, early_stopping=True, renormalize_logits=True,
    )  # fmt: skip
    (folder / "generation_config.json").write_text(json.dumps({**base, **settings}))
    hf = BartForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        free = hf.generate(**batch)
    # ban the first word of row 0 and a two-token word that row 1 produced
    row0 = [t for t in free[0, 1:].tolist() if t > 3]
    row1 = [t for t in free[1, 1:].tolist() if t > 3]
    bad = [[row0[0]], row1[1:3]]
    (folder / "generation_config.json").write_text(
        json.dumps({**base, **settings, "bad_words_ids": bad})
    )
    hf = BartForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        ids = hf.generate(**batch)
    assert not torch.equal(ids, free)  # the bad words changed the outputs
    expected = hf_tok.batch_decode(ids, skip_special_tokens=True)
    assert seq2seq.translate_texts(folder, LINES) == expected
    # a flag given wins over the folder's setting
    with torch.no_grad():
        greedy = hf.generate(**batch, num_beams=1, max_new_tokens=6)
    expected = hf_tok.batch_decode(greedy, skip_special_tokens=True)
    assert seq2seq.translate_texts(folder, LINES, num_beams=1, max_new_tokens=6) == expected


def test_marian_folder_tokenizer_and_greedy_equal_transformers(tmp_path: Path) -> None:
    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    rows = task_rows(PIG_LATIN_TASK, "train")[:2000]
    text = tmp_path / "text.txt"
    text.write_text("\n".join(r["source"] for r in rows), encoding="utf-8")
    folder = tmp_path / "opus"
    folder.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=300, minloglevel=2
    )
    for name in ("source.spm", "target.spm"):
        (folder / name).write_bytes((tmp_path / "sp.model").read_bytes())
    proc = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    pieces = [proc.id_to_piece(i) for i in range(proc.get_piece_size())]
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    torch.manual_seed(0)
    pad = vocab["<pad>"]
    config = MarianConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=pad,
        decoder_start_token_id=pad,
        eos_token_id=0,
        forced_eos_token_id=0,
    )
    MarianMTModel(config).save_pretrained(folder)
    hf_tok = MarianTokenizer(
        str(folder / "source.spm"), str(folder / "target.spm"), str(folder / "vocab.json")
    )
    hf = MarianMTModel.from_pretrained(folder).eval()
    loaded = seq2seq.load_seq2seq(folder)
    for line in LINES:
        assert seq2seq.source_ids(loaded, line) == hf_tok(line)["input_ids"]
    batch = hf_tok(LINES, return_tensors="pt", padding=True)
    with torch.no_grad():
        ids = hf.generate(**batch, max_new_tokens=10, num_beams=1, do_sample=False)
    expected = hf_tok.batch_decode(ids, skip_special_tokens=True)
    assert seq2seq.translate_texts(loaded, LINES, max_new_tokens=10) == expected


def test_a_long_source_is_cut_with_a_notice_or_refused(bart_folder: Path) -> None:
    loaded = seq2seq.load_seq2seq(bart_folder)
    long = " ".join(LINES * 20)
    with pytest.warns(LmarchNotice, match="cut to the encoder's 64"):
        ids = seq2seq.source_ids(loaded, long)
    assert len(ids) == 64 and ids[-1] == loaded.model.config.eos_token_id
    with pytest.raises(LmarchError, match="more than the encoder's 64"):
        seq2seq.source_ids(loaded, long, truncate=False)


def test_fine_tuning_lowers_the_loss_and_eval_scores_with_the_libraries(
    bart_folder: Path, tmp_path: Path
) -> None:
    import sacrebleu

    held_out = seq2seq.read_rows(PIG_LATIN_TASK, "test")[:32]
    before = seq2seq.mean_loss(seq2seq.load_seq2seq(bart_folder), held_out)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LmarchNotice)  # passages cut to 64 positions
        summary = seq2seq.train_seq2seq(
            "translate",
            str(bart_folder),
            PIG_LATIN_TASK,
            out,
            {"max_iters": 60, "batch_size": 16, "learning_rate": 3e-3, "eval_interval": 60},
            eval_rows=8,
            log=lambda *_: None,
        )
        assert summary["iters"] == 60 and summary["eval"]["rows"] == 8
        loaded = seq2seq.load_seq2seq(out)
        after = seq2seq.mean_loss(loaded, held_out)
        # 60 steps on Pig Latin: the held-out loss per token falls by over 1 nat (measured
        # 5.99 -> 4.61 when this was written)
        assert after < before - 1.0, (before, after)
        result = seq2seq.evaluate_seq2seq(out, PIG_LATIN_TASK, "test", limit=6)
        outputs = seq2seq.translate_texts(out, [r.source for r in held_out[:6]])
    refs = [r.target for r in held_out[:6]]
    assert result["bleu"] == sacrebleu.corpus_bleu(outputs, [refs]).score
    assert result["rougeL"] == seq2seq.score_outputs(outputs, refs)["rougeL"]
    assert [e["output"] for e in result["examples"]] == outputs[:3]
    assert result["rows"] == 6 and result["split"] == "test"


def test_read_rows_refuses_bad_data(tmp_path: Path) -> None:
    assert seq2seq.read_rows(PIG_LATIN_TASK, "valid")[0] == Seq2SeqPair(
        "Boatswain!", "Oatswainbay!", 1
    )
    with pytest.raises(LmarchError, match="data not found"):
        seq2seq.read_rows(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n\n{"source": "c", "target": "d"}\n')
    with pytest.raises(LmarchError, match="bad.jsonl:2: empty row"):
        seq2seq.read_rows(str(bad))
    bad.write_text('{"source": "a"}\n')
    with pytest.raises(LmarchError, match='row without "target"'):
        seq2seq.read_rows(str(bad))


# transformer-tiny trained from scratch with its own recipe (lmarch train's seq2seq objective),
# batches of 16 rows, then scored greedily on the first 100 rows of the test play (King Richard
# II). Measured when written (2 CPU cores shared with other jobs; ~16 and ~11 min of wall time
# there, a few minutes on idle cores): speakers, 300 steps: BLEU 21.7, chrF 31.2, ROUGE-L 32.5
# (49 rows); Pig Latin, 250 steps: BLEU 0.8, chrF 27.1, ROUGE-L 19.6 (100 rows; the BPE model
# has learned the suffixes "ay" / "way" and common words, not yet the consonant moves, so BLEU
# stays near 0 and chrF is the measure). The floors leave room for BLAS differences.
SLOW_CASES = [
    (SPEAKERS_TASK, 300, {"rougeL": 25.0, "bleu": 15.0}),
    (PIG_LATIN_TASK, 250, {"chrf": 20.0, "rougeL": 14.0}),
]


@pytest.mark.slow
@pytest.mark.parametrize("task, iters, floors", SLOW_CASES)
def test_a_few_cpu_minutes_reach_the_stated_scores(
    task: str, iters: int, floors: dict[str, float], tmp_path: Path
) -> None:
    torch.set_num_threads(2)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LmarchNotice)  # a few passages cut to 128 tokens
        seq2seq.train_seq2seq(
            "translate",
            "transformer-tiny",
            task,
            out,
            {"max_iters": iters, "batch_size": 16, "eval_interval": iters, "log_interval": 25},
            eval_rows=0,
            log=lambda *_: None,
        )
        result = seq2seq.evaluate_seq2seq(out, task, "test", limit=100)
    for metric, floor in floors.items():
        assert result[metric] >= floor, (metric, result[metric], result["examples"])
