import re

from michi.data import text


def test_sentences_are_clean_stable_and_split():
    train, held = text.sentences("train"), text.sentences("heldout")
    assert len(set(train)) == len(train) >= 3000
    assert 0.03 < len(held) / (len(train) + len(held)) < 0.07
    assert not set(train) & set(held)
    assert text.sentences("train") == train  # deterministic
    for s in train[::50] + held:
        assert s.isascii() and not re.search(r"\d", s), s
        assert 4 <= len(s.split()) <= 16, s
        assert s[0].isupper() and s[-1] in ".?", s
    assert all(text.is_heldout(s) for s in held)


def test_clean_sentence_rules():
    assert text.clean_sentence("the wind winnowed the grass") == "The wind winnowed the grass."
    assert text.clean_sentence("he paid 5 dollars for it") is None  # digits
    assert text.clean_sentence("Mr Smith went to the NASA office") is None  # abbreviation, acronym
    assert text.clean_sentence("too short") is None
    assert text.clean_sentence("he didn't go home today") == "He didn't go home today."


def test_text_corpus_splits():
    train, held = text.text_corpus("train"), text.text_corpus("heldout")
    assert len(train) > 1000 and len(held) > 50
    assert not set(train) & set(held)
    assert sum(len(t) for t in train) > 2_000_000
