"""Text evaluation: the context/continuation boundary of the scoring primitive (checked against one
full forward computed by hand), perplexity windows, the comparison report and the CLI."""
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import michi
from michi.data.text import read_texts
from michi.eval.text import (
    HFTextLM,
    MichiTextLM,
    TextLM,
    compare_perplexity,
    limit_bytes,
    load_text_lm,
    perplexity,
    select_indices,
)
from michi.eval.text_cli import add_text_eval_commands, heldout_texts

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs."


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def michi_lm():
    torch.manual_seed(0)
    return MichiTextLM(michi.load("tiny", seed=0), name="tiny")


def make_bpe_tokenizer(corpus, vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny Llama with a BPE tokenizer (merges, so tokens span several bytes)."""
    path = tmp_path_factory.mktemp("hf_random")
    tok = make_bpe_tokenizer([TEXT] * 20 + ["brown foxes and lazy dogs jump over boxes"] * 5)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def michi_by_hand(lm: MichiTextLM, seq):
    """Log-probs [len(seq)-1, base+1] of every next token of `seq`, one full forward, no batching."""
    bb, v = lm.backbone, lm.vocab
    with torch.no_grad():
        logits = bb.text_logits(bb(bb.embed_text(torch.tensor([seq]))))[0]
    return torch.cat([logits[:, : v.base], logits[:, v.eos:v.eos + 1]], -1).log_softmax(-1)[:-1]


def hf_by_hand(lm: HFTextLM, seq):
    with torch.no_grad():
        return lm.model(torch.tensor([seq])).logits[0].float().log_softmax(-1)[:-1]


def check_boundary(lm: TextLM, by_hand, context: str, continuation: str):
    ctx, cont = lm.encode_pair(context, continuation)
    seq = lm.prefix + ctx + cont
    lp = by_hand(lm, seq)
    first = len(lm.prefix) + len(ctx)  # index in seq of the first continuation token
    manual = sum(float(lp[p - 1, seq[p]]) for p in range(first, len(seq)))
    got = lm.logprobs(ctx, cont)
    assert got == pytest.approx(manual, abs=1e-4)
    # the test can fail: one position off either way gives another number
    shifted_late = sum(float(lp[p - 1, seq[p]]) for p in range(first + 1, len(seq)))
    assert abs(got - shifted_late) > 1e-3
    if first >= 2:  # a context token to score by mistake
        shifted_early = sum(float(lp[p - 1, seq[p]]) for p in range(first - 1, len(seq) - 1))
        assert abs(got - shifted_early) > 1e-3
    greedy = all(int(lp[p - 1].argmax()) == seq[p] for p in range(first, len(seq)))
    assert lm.score([(ctx, cont)])[0].greedy == greedy
    return ctx, cont, manual


def test_michi_continuation_logprob_matches_one_full_forward(michi_lm):
    assert michi_lm.prefix == [michi_lm.vocab.bos] and michi_lm.vocab_size == 257
    check_boundary(michi_lm, michi_by_hand, "The quick brown fox", " jumps over")
    check_boundary(michi_lm, michi_by_hand, "", "Hello")  # empty context: predicted from BOS alone


def test_hf_continuation_logprob_matches_one_full_forward(hf_dir):
    lm = load_text_lm(hf_dir)
    assert isinstance(lm, HFTextLM) and lm.prefix == [lm.tok.bos_token_id]
    ctx, cont, _ = check_boundary(lm, hf_by_hand, "The quick brown fox", " jumps over the lazy dog.")
    assert lm.decode(cont) == " jumps over the lazy dog." and len(cont) < len(" jumps over the lazy dog.")
    # trailing context spaces move into the continuation, as in lm-evaluation-harness
    assert lm.encode_pair("The quick brown ", "fox") == lm.encode_pair("The quick brown", " fox")


def test_batched_scores_equal_single_ones_whatever_the_padding(michi_lm, hf_dir):
    for lm in (michi_lm, load_text_lm(hf_dir)):
        requests = [lm.encode_pair(TEXT[:k], TEXT[k:k + n]) for k, n in [(5, 3), (40, 20), (1, 60), (70, 2)]]
        lm.batch_tokens = 10_000  # all in one padded batch
        batched = lm.score(requests)
        singles = [lm.logprobs(c, x) for c, x in requests]
        assert [s.logprob for s in batched] == pytest.approx(singles, abs=1e-4)
        assert [s.tokens for s in batched] == [len(x) for _, x in requests]


def test_long_context_is_truncated_from_the_left(michi_lm):
    lm = MichiTextLM(michi_lm.michi, max_length=16)
    ctx, cont = lm.encode(TEXT[:40]), lm.encode(TEXT[40:45])
    seq = (lm.prefix + ctx + cont)[-17:]  # 16 input positions
    lp = michi_by_hand(lm, seq)
    manual = sum(float(lp[p - 1, seq[p]]) for p in range(len(seq) - len(cont), len(seq)))
    assert lm.logprobs(ctx, cont) == pytest.approx(manual, abs=1e-4)


def test_perplexity_windows_score_every_token_once(michi_lm):
    lm = MichiTextLM(michi_lm.michi, max_length=16)
    ids = lm.encode(TEXT[:40])
    r = perplexity(lm, [TEXT[:40]], progress=False)
    assert r["tokens"] == r["bytes"] == 40 and r["documents"] == 1
    # windows of 16 inputs: [BOS]+ids[0:16] scores 16; ids[15:32] scores 16; ids[23:40] scores the last 8
    nll = 0.0
    for seq, n in [(lm.prefix + ids[:16], 16), (ids[15:32], 16), (ids[23:40], 8)]:
        lp = michi_by_hand(lm, seq)
        nll -= sum(float(lp[p - 1, seq[p]]) for p in range(len(seq) - n, len(seq)))
    assert r["nll_nats"] == pytest.approx(nll, abs=1e-3)
    assert r["bits_per_byte"] == pytest.approx(nll / 40 / math.log(2))
    assert r["token_perplexity"] == pytest.approx(math.exp(nll / 40))
    # a context that holds the whole text: one window, the plain log-likelihood from BOS
    full = perplexity(michi_lm, [TEXT[:40]], progress=False)
    assert full["nll_nats"] == pytest.approx(-michi_lm.logprobs([], ids), abs=1e-3)
    # a random byte model is near uniform over 257 outcomes
    assert 150 < full["token_perplexity"] < 450
    # max_tokens caps the scored tokens
    capped = perplexity(lm, [TEXT, TEXT], max_tokens=50, progress=False)
    assert capped["tokens"] == 50 and capped["documents"] == 1 and capped["bytes"] == 50


def test_perplexity_bytes_with_a_subword_tokenizer(hf_dir):
    lm = load_text_lm(hf_dir)
    r = perplexity(lm, [TEXT], progress=False)
    assert r["bytes"] == len(TEXT.encode()) and r["tokens"] == len(lm.encode(TEXT)) < r["bytes"]
    assert r["nll_nats"] == pytest.approx(-lm.logprobs([], lm.encode(TEXT)), abs=1e-3)
    assert r["byte_perplexity"] == pytest.approx(math.exp(r["nll_nats"] / r["bytes"]))


def test_compare_perplexity_reports_both_and_the_ratio(michi_lm, hf_dir):
    other = MichiTextLM(michi.load("tiny", seed=1), name="tiny-seed1")
    r = compare_perplexity(michi_lm, other, [TEXT, TEXT[::-1]], progress=False)
    assert r["same_tokenizer"] and r["ratio_basis"] == "token_perplexity"
    assert r["ratio"] == pytest.approx(r["a"]["token_perplexity"] / r["b"]["token_perplexity"])
    assert r["within_target"] == (r["ratio"] <= 1.10) and r["a"]["identity"]["trained"] is False
    same = compare_perplexity(michi_lm, michi_lm, [TEXT], progress=False)
    assert same["ratio"] == pytest.approx(1.0) and same["within_target"]
    mixed = compare_perplexity(michi_lm, str(hf_dir), [TEXT], max_bytes=30, progress=False)
    assert not mixed["same_tokenizer"] and mixed["ratio_basis"] == "byte_perplexity"
    assert mixed["a"]["bytes"] == mixed["b"]["bytes"] == 30 and mixed["ratio_token_perplexity"] is None


def test_selection_and_byte_caps_are_deterministic():
    a, b = select_indices(1000, 10), select_indices(1000, 40)
    assert a == select_indices(1000, 10) and a == sorted(a) and set(a) <= set(b) and len(b) == 40
    assert select_indices(5, 10) == list(range(5)) and select_indices(5, None) == list(range(5))
    assert limit_bytes(["abc", "défg", "hij"], 5) == ["abc", "d"]  # é is two bytes: not cut in half


def test_load_text_lm_refuses_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="preset"):
        load_text_lm("no-such-model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_text_lm(tmp_path)


def test_read_texts_and_heldout_corpus(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "b.txt").write_text("first doc\nstill first\n\nsecond doc\n")
    assert read_texts(tmp_path / "a.jsonl") == ["one", "two"]
    assert read_texts(tmp_path / "b.txt") == ["first doc\nstill first", "second doc"]
    assert read_texts(tmp_path) == ["first doc\nstill first\n\nsecond doc\n"]
    try:
        texts = heldout_texts()
    except FileNotFoundError as e:  # the Debian text packages are not installed here
        assert "install" in str(e) or "--texts" in str(e)
    else:
        from michi.data.text import text_corpus
        assert texts == text_corpus("heldout") and len(texts) > 10


def test_cli_text_with_baseline_writes_json(tmp_path, hf_dir, capsys):
    import argparse

    docs = tmp_path / "docs.txt"
    docs.write_text(f"{TEXT}\n\n{TEXT[::-1]}\n\nA third, short one.\n")
    parser = argparse.ArgumentParser()
    add_text_eval_commands(parser.add_subparsers(dest="cmd"))
    out = tmp_path / "ppl.json"
    args = parser.parse_args(["text", "--model", "tiny", "--baseline", str(hf_dir), "--texts", str(docs),
                              "--limit", "2", "--out", str(out), "--device", "cpu"])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["data"]["documents"] == 2 and report["data"]["documents_available"] == 3
    assert report["model"]["identity"]["kind"] == "michi" and report["baseline"]["identity"]["kind"] == "hf"
    assert report["ratio_basis"] == "byte_perplexity" and math.isfinite(report["ratio"])
    assert "ratio model/baseline" in capsys.readouterr().out
