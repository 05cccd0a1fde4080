"""The word trigram LM of the phoneme decoder: a distribution over the next word given two, words
it never saw spelled by the character LM, and homophones told apart by the words two back, which
the character LM's five characters cannot see."""
import math

from test_lexicon import BLANK, TEXTS, slots, ticks

from michi.model.lexicon import Lexicon, PhoneBeamDecoder
from michi.model.phonemes import word_ctc_phonemes
from michi.model.textlm import CharLM
from michi.model.wordlm import END, WordLM

HOMOPHONES = ["seven beautiful knights rode home", "three beautiful nights went by"] * 3


def test_a_distribution_over_the_next_word(tmp_path):
    spell = CharLM.train(TEXTS * 3)
    lm = WordLM.train(TEXTS, spell)
    vocabulary = lm.words | {END}
    for context in (" ", "on the ", "we went ", "quite unseen "):
        known = sum(math.exp(lm.word_logp(context, w)) for w in vocabulary)
        assert 0.9 < known < 1.0  # the rest is for words the texts never had
    assert lm.word_logp("on the ", "mat") > lm.word_logp(" ", "mat")  # "on the mat" was seen
    assert lm.word_logp("on the ", "mat") > lm.word_logp("on the ", "cats")
    unseen = lm.word_logp("on the ", "hat")  # never seen: spelled by the character LM
    assert math.isfinite(unseen) and unseen < lm.word_logp("on the ", "cats")
    loaded = WordLM.load(lm.save(tmp_path / "word_lm.json.gz"), spell)
    assert loaded.trigrams == lm.trigrams and loaded.word_logp("the cat ", "is") == lm.word_logp("the cat ", "is")


def test_homophones_by_the_words_two_back():
    assert word_ctc_phonemes("knights") == word_ctc_phonemes("nights")
    spell = CharLM.train(HOMOPHONES)
    lexicon = Lexicon.build(spell.words)
    said = ["seven beautiful knights", "three beautiful nights"]

    def heard(lm):
        d = PhoneBeamDecoder(lm, lexicon, BLANK)
        return [("".join(ticks(d, slots(text))) + d.finish()).strip() for text in said]

    assert heard(WordLM.train(HOMOPHONES, spell)) == said
    assert heard(spell) != said  # the character LM hears "iful " before both: one spelling for both
