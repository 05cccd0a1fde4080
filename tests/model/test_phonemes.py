"""The agent's phoneme stream: espeak-ng phonemes of real words, their place on the ticks, the
engine's queue, and cached stepping with phonemes equal to the training path's full forward."""
import numpy as np
import pytest
import torch

from michi.config import tiny_melpca
from michi.data.align import align_frames, frame_slots, word_phone_times
from michi.engine import BackboneEngine, HistoryTick, TickInput
from michi.model.michi import MichiModel
from michi.model.phonemes import (
    FRAME_START,
    NO_PHONE,
    PHONE_SLOTS,
    FrameQueue,
    PhonemeQueue,
    match_words,
    symbols,
    text_phonemes,
    word_phonemes,
)
from michi.model.tokenizer import ByteTokenizer
from michi.train.batches import next_phones


def test_words_become_espeak_phonemes():
    assert symbols(word_phonemes("through")) == "θɹˈuː"
    assert symbols(word_phonemes("tough")) == "tˈʌf"  # same spelling, other sounds: why phonemes
    assert word_phonemes("World.")[-1] == word_phonemes("x.")[-1]  # punctuation is kept (a pause)
    assert word_phonemes("   ") == ()
    assert all(0 < i < 256 for w in text_phonemes("The quick brown fox.") for i in w)


def test_text_is_phonemized_in_its_sentence_as_piper_speaks_it():
    """Training labels come from piper, which phonemizes whole sentences: function words reduce
    and join there. Forced text is phonemized the same way, one group per text word."""
    from piper.phonemize_espeak import EspeakPhonemizer

    text = "It is a good idea to read for the  children\tnow."
    groups = text_phonemes(text)
    assert len(groups) == len(text.split())
    piper = "".join(c for s in EspeakPhonemizer().phonemize("en-us", text) for c in s)
    assert symbols(sum(groups, ())) == piper.replace(" ", "")  # the sentence's phonemes, all of them
    words = dict(zip(text.split(), groups))
    assert symbols(words["a"]) != symbols(word_phonemes("a"))  # reduced in context (ɐ, not ˈeɪ)
    assert symbols(words["for"]) == "fɚðə" and words["the"] == ()  # joined: the first word carries it
    assert text_phonemes("") == ()


def test_control_characters_are_not_spoken():
    """A model may emit any byte (NUL included) and espeak refuses control characters: they are
    dropped, so the words around them keep their phonemes and no tick fails."""
    assert text_phonemes("hello\x00 wor\x01ld \x00") == text_phonemes("hello world") + ((),)
    assert word_phonemes("\x00") == ()


def test_word_phonemes_are_cached():
    """Every forced word and every training clip's words go through espeak here: once per word."""
    word_phonemes("cached")
    hits = word_phonemes.cache_info().hits
    word_phonemes("cached")
    assert word_phonemes.cache_info().hits == hits + 1


def test_word_matching_pairs_groups_either_way():
    a, b, c = (1, 2), (3,), (4, 5, 6)
    assert match_words([a, b, c], [a + b, c]) == [a + b, (), c]  # two text words, one spoken
    assert match_words([a + b, c], [a, b, c]) == [a + b, c]  # one text word spoken as two
    assert match_words([a, b, c], [(1, 9), (3,), (4, 5)]) == [(1, 9), (3,), (4, 5)]  # spoken differently


def test_word_times_give_evenly_spread_phonemes_and_silence_between():
    words = [("cat", 0.16, 0.48), ("sat", 0.6, 0.9)]
    times = word_phone_times(words)
    cat, sat = word_phonemes("cat"), word_phonemes("sat")
    assert [p for p, _ in times] == list(cat) + [NO_PHONE] + list(sat) + [NO_PHONE]
    assert times[0][1] == 0.16 and times[len(cat)] == (NO_PHONE, 0.48) and times[-1] == (NO_PHONE, 0.9)
    starts = [t for _, t in times]
    assert starts == sorted(starts) and times[1][1] == pytest.approx(0.16 + 0.32 / len(cat))


def test_frames_carry_the_phoneme_of_each_10_ms_frame_and_where_it_begins():
    # Frame f of the delayed stream is labelled at its window's centre: (f - 1) * 10 ms - delay.
    times = [(5, 0.10), (6, 0.135), (7, 0.138), (NO_PHONE, 0.30), (NO_PHONE, 0.35)]
    stats = {}
    frames = align_frames(times, n_ticks=6, delay_ticks=1, stats=stats)
    flat = frames.reshape(-1)
    assert (flat[:19] == NO_PHONE).all()  # before the first phoneme: silence, no start
    assert flat[19] == 5 + FRAME_START and (flat[20:23] == 5).all()  # 0.10 s: frame 19 = tick 2, frame 3
    assert flat[23] == 7 + FRAME_START  # phoneme 6 (3 ms) is too short for a frame: dropped
    assert (flat[24:39] == 7).all() and flat[39] == FRAME_START  # a silence begins after the last
    assert (flat[40:] == NO_PHONE).all()  # and a silence after silence is no new start
    assert stats == {"phonemes": 2, "phonemes_dropped": 1}
    slots = frame_slots(frames, PHONE_SLOTS)
    assert slots[2].tolist() == [5, 7, 0, 0] and (np.delete(slots, 2, 0) == NO_PHONE).all()
    assert next_phones(frames).tolist() == [5, 5, 0, 0, 0, 0]


def test_an_uncertain_head_moves_at_its_expected_pace():
    """p(take one) = 0.4 each tick: two phonemes in five ticks, none held to max_hold; a sure head
    takes what it says; an empty queue carries no credit into the next text."""
    q = PhonemeQueue(ByteTokenizer().decode, slots=2, max_hold=10)
    q.add_text("strengths", forced=True)
    takes = []
    for _ in range(10):
        q.pace([0.6, 0.4, 0.0])
        takes.append(sum(p != NO_PHONE for p in q.next_tick()[0]))
    assert sum(takes) == 4 and max(takes) == 1 and q.held < 3, takes
    q.pace([0.0, 0.0, 1.0])
    assert q.take == 2
    empty = PhonemeQueue(ByteTokenizer().decode, slots=2)
    for _ in range(5):
        empty.pace([0.5, 0.5, 0.0])
    assert empty.take == 0 and empty.credit == 0.0


def test_queue_paces_forced_text_and_phonemizes_own_words():
    tok = ByteTokenizer()
    q = PhonemeQueue(tok.decode, slots=2, max_hold=2)
    q.add_text("cat sat", forced=True)
    assert q.forced == len(word_phonemes("cat") + word_phonemes("sat"))
    want = list(word_phonemes("cat") + word_phonemes("sat"))
    got = []
    for take in (1, 2, 0, 0, 0, 2, 2, 2, 2, 2):
        q.take = take
        phones, nxt = q.next_tick()
        assert len(phones) == 2
        taken = [p for p in phones if p != NO_PHONE]
        if take == 0 and q.held == 0:  # held past max_hold: one is taken anyway
            assert len(taken) == 1
        got += taken
        assert nxt == (q.queue[0] if q.queue else NO_PHONE)
    assert got == want and q.forced == 0
    own = PhonemeQueue(tok.decode, slots=2)
    for t in tok.encode("hi there"):
        own.own_token(t, True)
    assert list(own.queue) == list(word_phonemes("hi"))  # "there" is not over yet
    own.own_token(-1, False)  # a stream token ends it
    assert list(own.queue) == list(word_phonemes("hi") + word_phonemes(" there"))
    assert own.forced == 0  # the agent's own words: TTS does not wait for them


def test_frame_queue_moves_at_the_heads_pace_and_ends_in_silence():
    """Starts at the expected count (1.2 a tick here), at the most likely frames; every queued
    phoneme is spoken in order, each from the frame where it begins; after the last, silence."""
    q = FrameQueue(ByteTokenizer().decode, max_hold=10)
    q.add_text("cat sat", forced=True)
    want = list(word_phonemes("cat") + word_phonemes("sat"))
    probs = [0.05] * 8
    probs[5] = 0.85
    labels = []
    for _ in range(12):
        q.pace(probs)
        tick, nxt = q.next_tick()
        assert len(tick) == 8 and nxt == (q.queue[0] if q.queue else NO_PHONE)
        labels += tick
    begun = [lab - FRAME_START for lab in labels if lab >= FRAME_START]
    assert begun[: len(want)] == want and q.forced == 0  # all spoken, in order
    assert begun[len(want)] == NO_PHONE and labels[-1] == NO_PHONE  # then a silence, which stays
    assert all(lab >= FRAME_START for lab in labels[5::8][:5])  # the likeliest frame starts first
    # Between starts a frame carries the phoneme still sounding.
    first = labels.index(want[0] + FRAME_START)
    assert labels[first + 1] == want[0]
    # A head that never moves is overruled after max_hold ticks; an empty queue reads silence.
    held = FrameQueue(ByteTokenizer().decode, max_hold=2)
    held.add_text("hi")
    ticks = []
    for _ in range(3):
        held.pace([0.0] * 8)
        ticks.append(held.next_tick()[0])
    assert ticks[0] == ticks[1] == [NO_PHONE] * 8 and ticks[2][0] == word_phonemes("hi")[0] + FRAME_START
    empty = FrameQueue(ByteTokenizer().decode)
    empty.pace([0.9] * 8)
    assert empty.next_tick() == ([NO_PHONE] * 8, NO_PHONE) and empty.credit == 0.0


def _pace(queue, take: int) -> None:
    """Drive the pace by hand (a random head says anything): `take` starts next tick."""
    if isinstance(queue, FrameQueue):
        queue.pace([take / 8] * 8)
    else:
        queue.take = take


@pytest.fixture(scope="module", params=["slots", "frames"])
def model(request):
    torch.manual_seed(0)
    cfg = tiny_melpca()
    cfg.durations = False  # the advance head paces (the duration predictor's pace: test_durations.py)
    if request.param == "slots":
        cfg.phone_frames, cfg.phone_slots = False, PHONE_SLOTS
    m = MichiModel(cfg).eval()  # random weights and an unfitted basis: plumbing only
    with torch.no_grad():
        if request.param == "slots":
            m.backbone.phone_slot.normal_()
    return m


def test_call_rebuilt_by_replay_goes_on_with_the_same_phonemes(model):
    """A call replayed from its history (phonemes included, as the gateway stores them) goes on
    exactly as the live call: the history carries what the phoneme stream fed each tick."""
    dim = model.cfg.latent_dim
    live = BackboneEngine(model, rows=1)
    live.open("a", seed=3)
    live.force_text("a", list(b"the cat sat on the mat"))
    gen = torch.Generator().manual_seed(0)
    xs = [TickInput(torch.randn(dim, generator=gen)) for _ in range(10)]
    outs = []
    for i, x in enumerate(xs):
        _pace(live.rows[0].phonemes, i % 3)
        outs.append(live.tick({"a": x})["a"])
    starts = [p for o in outs for p in o.phones if (p > FRAME_START if model.cfg.phone_frames else p != NO_PHONE)]
    assert len(starts) == sum(i % 3 for i in range(9))
    rebuilt = BackboneEngine(model, rows=1)
    rebuilt.open("b", seed=3)
    history = [HistoryTick(x.user_latent, [], o.agent_token, o.agent_latent, o.phones, o.next_phone)
               for x, o in zip(xs, outs)]
    assert rebuilt.replay("b", history) == 10
    rebuilt.rows[0].phonemes.queue = live.rows[0].phonemes.queue.copy()  # what the gateway re-forces
    rebuilt.rows[0].forced_text = live.rows[0].forced_text.copy()
    rebuilt.rows[0].pad_run = live.rows[0].pad_run
    rebuilt.rows[0].generator.set_state(live.rows[0].generator.get_state())
    if model.cfg.phone_frames:
        rebuilt.rows[0].phonemes.current = live.rows[0].phonemes.current
    for r in (live.rows[0], rebuilt.rows[0]):
        _pace(r.phonemes, 2)
    x = TickInput(torch.randn(dim, generator=gen))
    a, b = live.tick({"a": x})["a"], rebuilt.tick({"b": x})["b"]
    assert a.phones == b.phones and a.agent_token == b.agent_token
    assert torch.allclose(a.agent_latent, b.agent_latent, atol=1e-5)
    # Without the phonemes in the history the rebuilt call would differ: they are real inputs.
    blind = BackboneEngine(model, rows=1)
    blind.open("c", seed=3)
    blind.replay("c", [HistoryTick(h.user_latent, [], h.agent_token, h.agent_latent) for h in history])
    blind.rows[0].generator.set_state(live.rows[0].generator.get_state())
    assert not torch.allclose(blind.tick({"c": x})["c"].agent_latent, a.agent_latent, atol=1e-5)


def test_forced_words_are_said_when_their_sound_is_due():
    """With a phoneme stream a forced word's text waits until its first phoneme is next (in
    training a word's text leads its sound by about a tick), and the agent says no words of its
    own meanwhile; TTS counts the held words as pending."""
    torch.manual_seed(0)
    engine = BackboneEngine(MichiModel(tiny_melpca()).eval(), rows=1)  # random weights: plumbing
    engine.open("a", seed=0)
    text = "cat sat on"
    engine.force_text("a", list(text.encode()))
    row = engine.rows[0]
    assert [bytes(w).decode() for w in row.held_words] == ["cat", " sat", " on"]
    assert engine.forced_pending("a") == len(text)
    q = row.phonemes
    said, sounding = b"", []
    starts = {b" s": len(word_phonemes("cat")), b" o": len(word_phonemes("cat") + word_phonemes("sat"))}
    for _ in range(40):
        q.pace([0.6 / 8] * 8)  # the pace this tick's phonemes are taken at (the engine reads it first)
        out = engine.tick({"a": TickInput(torch.zeros(engine.model.cfg.latent_dim))})["a"]
        sounding.append(q.added - q.forced)  # forced phonemes begun so far
        said += bytes([out.agent_token]) if out.agent_token < 256 else b""
        for word, begun in starts.items():
            if word in said:  # a word's text never comes before the words ahead of it have begun
                assert sounding[-1] >= begun, (said, sounding)
        if not engine.forced_pending("a"):
            break
    assert said == text.encode()
