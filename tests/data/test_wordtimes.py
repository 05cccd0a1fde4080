from michi.data.wordtimes import align_known_words, tokens, word_errors


def test_tokens_and_wer():
    assert tokens("Soft-spoken, he didn't!") == ["soft", "spoken", "he", "didn't"]
    assert word_errors("the cat sat", "The cat, sat.") == (0, 3)
    assert word_errors("the cat sat", "a cat") == (2, 3)


def test_exact_missed_and_substituted_words():
    text = "The quick brown fox jumps."
    heard = [("the", 0.3, 0.5), ("quack", 0.5, 0.9), ("fox", 1.4, 1.8), ("jumps", 1.8, 2.4)]
    [res] = align_known_words([text], [(0.0, 2.8)], [(0.2, 2.6)], heard)
    assert [w for w, _, _ in res.words] == text.split()
    times = {w: (s, e) for w, s, e in res.words}
    assert times["The"] == (0.3, 0.5) and times["fox"] == (1.4, 1.8)
    # "quick brown" vs "quack": spread over Whisper's span or interpolated before "fox".
    assert 0.5 <= times["quick"][0] <= times["brown"][0] <= 1.4
    assert res.matched == 3 / 5
    starts = [s for _, s, _ in res.words]
    assert starts == sorted(starts)


def test_pack_of_two_clips_and_nothing_heard():
    texts = ["Hello there.", "Good night moon."]
    spans = [(0.0, 2.0), (2.6, 5.0)]
    heard = [("Hello", 0.3, 0.8), ("there.", 0.8, 1.6), ("good", 2.9, 3.3), ("night", 3.3, 3.8),
             ("moon", 3.8, 4.6)]
    a, b = align_known_words(texts, spans, [(0.2, 1.8), (0.2, 2.2)], heard)
    assert a.words == [("Hello", 0.3, 0.8), ("there.", 0.8, 1.6)]
    assert b.words == [("Good", 0.3, 0.7), ("night", 0.7, 1.2), ("moon.", 1.2, 2.0)]
    assert a.asr_text == "Hello there." and b.matched == 1.0
    [c] = align_known_words(["Nobody heard me."], [(0.0, 3.0)], [(0.2, 2.8)], [])
    assert c.matched == 0.0 and c.words[0][1] == 0.2 and c.words[-1][2] == 2.8
