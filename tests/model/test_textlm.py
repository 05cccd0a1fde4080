"""The character LM and the CTC prefix beam search the listen text head decodes with."""
import math

import pytest
import torch

from michi.model.textlm import ALPHABET, BeamDecoder, CharLM

TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "the hat is on the cat"] * 3
BLANK = 256


@pytest.fixture(scope="module")
def lm():
    return CharLM.train(TEXTS, order=4, min_count=1)


def test_lm_is_a_distribution(lm):
    for history in ("", " ", "the c", "zzz", "on the m"):
        total = sum(math.exp(lm.logp(history, c)) for c in ALPHABET)
        assert total == pytest.approx(1.0, abs=1e-9), history
    assert lm.logp("the c", "a") > lm.logp("the c", "q")


def test_lm_saves_and_loads(lm, tmp_path):
    lm.decoder = {"alpha": 0.7, "beta": 0.5, "beam": 4}
    back = CharLM.load(lm.save(tmp_path / "lm.json.gz"))
    assert back.counts == lm.counts and back.order == lm.order and back.decoder == lm.decoder
    assert back.logp("the ", "c") == lm.logp("the ", "c")


def _slots(text: str, ambiguous: dict[int, str] | None = None, sharp: float = 8.0) -> torch.Tensor:
    """CTC log-probs [slots, 257] that spell `text`, a blank between characters; at the positions
    in `ambiguous` two letters are equally likely."""
    rows = []
    for i, ch in enumerate(text):
        row = torch.zeros(BLANK + 1)
        row[ord(ch)] = sharp
        for other in (ambiguous or {}).get(i, ""):
            row[ord(other)] = sharp
        rows.append(row)
        blank = torch.zeros(BLANK + 1)
        blank[BLANK] = sharp
        rows.append(blank)
    return torch.stack(rows).log_softmax(-1)


def test_beam_search_reads_what_is_spelled_and_streams_stable_text(lm):
    decoder = BeamDecoder(lm, BLANK, alpha=0.5, beta=0.5)
    slots = _slots("the cat sat")
    stable = []
    for tick in slots.split(4):  # a tick's slots at a time
        stable.append(decoder.step(tick))
        assert decoder.interim == max(decoder.beams, key=lambda p: decoder._score(p, decoder.beams[p]))
    text = "".join(stable) + decoder.finish()
    assert text == "the cat sat"
    assert "".join(stable).startswith("the c")  # most of it was stable before the end
    whole = BeamDecoder(lm, BLANK, alpha=0.5, beta=0.5)
    assert whole.step(slots) + whole.finish() == text  # chunking does not matter


def test_the_lm_settles_what_the_acoustics_leave_open(lm):
    slots = _slots("the cat", ambiguous={4: "k"})  # "cat" or "kat"
    for alpha, want in ((0.0, None), (1.0, "the cat")):
        decoder = BeamDecoder(lm, BLANK, alpha=alpha, beta=0.0)
        text = decoder.step(slots) + decoder.finish()
        assert text in ("the cat", "the kat") and (want is None or text == want)


def test_repeated_letters_need_a_blank(lm):
    row = torch.zeros(BLANK + 1)
    row[ord("o")] = 8.0
    slots = torch.stack([row, row, row]).log_softmax(-1)  # "o" three slots in a row: one "o"
    decoder = BeamDecoder(lm, BLANK, alpha=0.0, beta=0.0)
    assert decoder.step(slots) + decoder.finish() == "o"
    assert decoder.step(_slots("oo")) + decoder.finish() == "oo"


def test_a_pause_makes_the_best_beam_stable(lm):
    """Beams that parted before a pause ("cat" or "kat") would hold the stable text back until
    the next words; a pause of `settle` sure blanks keeps only the best, so it is stable."""
    silence = torch.zeros(BLANK + 1)
    silence[BLANK] = 12.0
    pause = silence.expand(12, -1).log_softmax(-1)
    slots = _slots("the cat", ambiguous={4: "k"}, sharp=12.0)
    held = BeamDecoder(lm, BLANK, alpha=0.0, beta=0.0, settle=10 ** 6)
    assert held.step(slots) + held.step(pause) == "the "  # the beams still disagree
    decoder = BeamDecoder(lm, BLANK, alpha=0.0, beta=0.0, settle=10)
    stable = decoder.step(slots) + decoder.step(pause[:8])  # with the blank after "t": 9 in a row
    assert stable == "the " and len(decoder.beams) > 1
    stable += decoder.step(pause[8:])
    assert stable in ("the cat", "the kat") and decoder.finish() == ""


def test_a_word_outside_the_lexicon_costs_the_oov_penalty(lm, tmp_path):
    """The acoustics lean to "kat" (not a word of the LM's texts), the LM barely counts: the
    penalty for ending a word outside the lexicon turns it to "cat"; a lexicon-less LM (an older
    file) ignores the setting."""
    assert {"the", "cat", "sat"} <= lm.words and "kat" not in lm.words
    assert CharLM.load(lm.save(tmp_path / "lm.json.gz")).words == lm.words
    rows = []
    for ch in "the kat sat":
        row = torch.zeros(BLANK + 1)
        row[ord(ch)] = 12.0
        if ch == "k":
            row[ord("c")] = 11.5
        blank = torch.zeros(BLANK + 1)
        blank[BLANK] = 12.0
        rows += [row, blank]
    slots = torch.stack(rows).log_softmax(-1)
    heard = {oov: (d := BeamDecoder(lm, BLANK, alpha=0.01, beta=0.0, oov=oov)).step(slots) + d.finish()
             for oov in (0.0, -100.0)}
    assert heard == {0.0: "the kat sat", -100.0: "the cat sat"}
    bare = CharLM(lm.counts, lm.order)
    assert (d := BeamDecoder(bare, BLANK, alpha=0.01, beta=0.0, oov=-100.0)).step(slots) + d.finish() == "the kat sat"
