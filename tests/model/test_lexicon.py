"""Words from phonemes: the lexicon trie, and the beam search that reads phoneme CTC slots into
the words of a lexicon (real espeak-ng phonemes; the slots are made from them, peaky as a trained
CTC head's, with a little doubt spread over every other phoneme)."""
import torch

from michi.model.lexicon import Lexicon, PhoneBeamDecoder
from michi.model.phonemes import NUM_PHONEME_IDS, ctc_phonemes, word_ctc_phonemes
from michi.model.textlm import CharLM

BLANK = NUM_PHONEME_IDS
TEXTS = ["i want to go home", "two cats sat on the mat", "the cat is on the mat", "hello there world",
         "we went home too", "a dog and a cat"]


def slots(text: str, pause: int = 0) -> torch.Tensor:
    """Log-probs [n, phonemes + 1]: each phoneme of `text` for two slots, then a blank; `pause`
    blank slots after."""
    rows = []
    for p in ctc_phonemes(text):
        rows += [p, p, BLANK]
    rows += [BLANK] * pause
    logits = torch.full((len(rows), NUM_PHONEME_IDS + 1), -9.0)
    logits[torch.arange(len(rows)), torch.tensor(rows)] = 0.0
    return logits.log_softmax(-1)


def decoder(**settings) -> PhoneBeamDecoder:
    lm = CharLM.train(TEXTS * 3)
    return PhoneBeamDecoder(lm, Lexicon.build(lm.words), BLANK, **settings)


def ticks(decoder: PhoneBeamDecoder, log_probs: torch.Tensor, per_tick: int = 4) -> list[str]:
    return [decoder.step(log_probs[i:i + per_tick]) for i in range(0, len(log_probs), per_tick)]


def test_lexicon_trie_and_file(tmp_path):
    lex = Lexicon.build(["cat", "cats", "two", "too"])
    node = 0
    for p in word_ctc_phonemes("cat"):
        node = lex.child(node, p)
        assert node is not None and lex.phone[node] == p
    assert lex.ends[node] == ["cat"]
    assert lex.child(node, word_ctc_phonemes("cats")[-1]) in lex.ends  # cats goes on from cat
    assert word_ctc_phonemes("two") == word_ctc_phonemes("too")  # homophones share a node
    loaded = Lexicon.load(lex.save(tmp_path / "lexicon.json.gz"))
    assert loaded.pronunciations == lex.pronunciations and loaded.edges == lex.edges
    assert loaded.ends == lex.ends and loaded.decoder == lex.decoder


def test_decodes_words_and_picks_homophones_by_the_lm():
    d = decoder()
    for text in ("i want to go home", "two cats sat on the mat", "we went home too"):
        assert "".join(ticks(d, slots(text))) + d.finish() == " " + text


def test_streaming_equals_one_step_and_a_pause_makes_text_stable():
    log_probs = slots("the cat is on the mat", pause=25)
    whole = decoder()
    stable = whole.step(log_probs)
    assert stable == " the cat is on the mat"  # the pause ended the last word: nothing waits for finish
    assert whole.finish() == ""
    d = decoder()
    pieces = ticks(d, log_probs)
    assert "".join(pieces) == stable
    assert sum(1 for p in pieces if p) > 1  # words became stable as they went, not only at the end


def test_unknown_phonemes_give_no_words():
    d = decoder()
    noise = slots("zebra quagga")  # no word of the lexicon sounds so
    assert "".join(ticks(d, noise)) + d.finish() == ""


def test_lookahead_is_the_best_word_below_each_node():
    lm = CharLM.train(TEXTS * 3)
    lex = Lexicon.build(lm.words)
    hope = lex.lookahead(lm)
    assert lex.lookahead(lm) is hope  # computed once per LM

    def logp(word):
        text = f" {word} "
        return sum(lm.logp(text[:i], text[i]) for i in range(1, len(text)))

    def below(node):  # the words at or below a node
        out = list(lex.ends.get(node, []))
        for key, child in lex.edges.items():
            if key // NUM_PHONEME_IDS == node:
                out += below(child)
        return out

    for node in (0, lex.child(0, word_ctc_phonemes("cat")[0]), lex.child(0, word_ctc_phonemes("the")[0])):
        assert abs(hope[node] - max(logp(w) for w in below(node))) < 1e-4
