"""The agent's phoneme stream: espeak-ng phonemes of real words, their place on the ticks, the
engine's queue, and cached stepping with phonemes equal to the training path's full forward."""
import numpy as np
import pytest
import torch

from michi.config import tiny_melpca
from michi.data.align import align_phonemes
from michi.engine import BackboneEngine, HistoryTick, TickInput
from michi.model.michi import MichiModel
from michi.model.phonemes import NO_PHONE, PHONE_SLOTS, PhonemeQueue, symbols, text_phonemes, word_phonemes
from michi.model.tokenizer import ByteTokenizer
from michi.train.batches import next_phones


def test_words_become_espeak_phonemes():
    assert symbols(word_phonemes("through")) == "θɹˈuː"
    assert symbols(word_phonemes("tough")) == "tˈʌf"  # same spelling, other sounds: why phonemes
    assert word_phonemes("World.")[-1] == word_phonemes("x.")[-1]  # punctuation is kept (a pause)
    assert word_phonemes("   ") == ()
    assert [symbols(p) for p in text_phonemes("a  cat\tsat")] == [symbols(word_phonemes(w)) for w in ("a", "cat", "sat")]
    assert all(0 < i < 256 for w in text_phonemes("The quick brown fox.") for i in w)


def test_phonemes_spread_over_their_words_audio():
    words = [("cat", 0.16, 0.48), ("sat", 0.48, 0.80)]  # ticks 2..6 and 6..10, delay 1
    stats = {}
    phones = align_phonemes(words, n_ticks=14, delay_ticks=1, slots=PHONE_SLOTS, stats=stats)
    placed = [(t, int(p)) for t in range(14) for p in phones[t] if p != NO_PHONE]
    cat, sat = word_phonemes("cat"), word_phonemes("sat")
    assert [p for _, p in placed] == list(cat + sat)  # all of them, in order
    assert stats == {"phonemes": len(cat) + len(sat), "phonemes_dropped": 0}
    cat_ticks = [t for t, _ in placed[: len(cat)]]
    assert cat_ticks[0] == 3 and cat_ticks[-1] < 3 + 4  # first at its start (+ delay), within its span
    assert placed[len(cat)][0] >= 7  # "sat" starts where its audio does, not before
    # Slots are a hard limit: a long word in one tick overflows to the next ticks, in order.
    crammed = align_phonemes([("unbelievable", 0.0, 0.01)], 10, 0, 2)
    flat = [int(p) for row in crammed for p in row if p != NO_PHONE]
    assert flat == list(word_phonemes("unbelievable")) and (crammed != NO_PHONE).sum(1).max() == 2
    # Past the end: dropped and counted.
    stats = {}
    align_phonemes([("unbelievable", 0.0, 0.01)], 2, 0, 2, stats)
    assert stats["phonemes"] == 4 and stats["phonemes_dropped"] == len(word_phonemes("unbelievable")) - 4


def test_next_phone_is_the_first_one_after_each_tick():
    phones = np.array([[0, 0], [5, 6], [0, 0], [7, 0], [0, 0]])
    assert next_phones(phones).tolist() == [5, 7, 7, 0, 0]


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


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MichiModel(tiny_melpca()).eval()  # random weights and an unfitted basis: plumbing only
    with torch.no_grad():
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
        live.rows[0].phonemes.take = i % 3  # drive the pace by hand: a random head says anything
        outs.append(live.tick({"a": x})["a"])
    assert sum(p != NO_PHONE for o in outs for p in o.phones) == sum(i % 3 for i in range(9))
    rebuilt = BackboneEngine(model, rows=1)
    rebuilt.open("b", seed=3)
    history = [HistoryTick(x.user_latent, [], o.agent_token, o.agent_latent, o.phones, o.next_phone)
               for x, o in zip(xs, outs)]
    assert rebuilt.replay("b", history) == 10
    rebuilt.rows[0].phonemes.queue = live.rows[0].phonemes.queue.copy()  # what the gateway re-forces
    rebuilt.rows[0].forced_text = live.rows[0].forced_text.copy()
    rebuilt.rows[0].pad_run = live.rows[0].pad_run
    rebuilt.rows[0].generator.set_state(live.rows[0].generator.get_state())
    for r in (live.rows[0], rebuilt.rows[0]):
        r.phonemes.take = 2
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
