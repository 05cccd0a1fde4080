"""The phoneme-label probe (`michi.eval.template_probe`): its features, its fit, and piper's own
phoneme timings."""
import numpy as np

from michi.eval.template_probe import (FRAMES_PER_TICK, V, corpus_features, fit, frame_features, piper_synth,
                                       tick_labels)
from michi.model.phonemes import word_phonemes


def test_the_ridge_fit_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, size=(4000, FRAMES_PER_TICK))
    x = frame_features(labels)
    assert x.shape == (4000, FRAMES_PER_TICK * V + 1) and (x.sum(1) == FRAMES_PER_TICK + 1).all()
    w = rng.normal(size=(x.shape[1], 3))
    got, ticks = fit([(x[:2000], x[:2000] @ w), (x[2000:], x[2000:] @ w)])
    assert ticks == 4000
    assert np.abs(x @ got - x @ w).max() < 0.05 * np.abs(x @ w).max()


def test_corpus_features_read_slots_the_last_tick_and_the_next_phoneme():
    phones = np.array([[0, 0], [5, 6], [0, 0], [7, 0]])
    x = corpus_features(phones)
    slots = 2
    assert x[0, (slots + 2) * V] == 1 and x[2, (slots + 2) * V] == 1  # silent ticks
    assert x[1, 5] == 1 and x[1, V + 6] == 1  # this tick's slots, in order
    assert x[2, slots * V + 5] == 1 and x[2, slots * V + 6] == 1  # the last tick's, as a bag
    assert x[0, (slots + 1) * V + 5] == 1 and x[2, (slots + 1) * V + 7] == 1  # the next waiting
    assert (x[:, -1] == 1).all()


def test_tick_labels_take_each_frame_centre():
    labels = np.repeat(np.arange(1, 17), 240)  # a new label every 10 ms frame at 24 kHz
    ticks = tick_labels(labels, 3, 1920)
    assert ticks.tolist()[:2] == [list(range(1, 9)), list(range(9, 17))]
    assert ticks[2].tolist() == [0] * 8  # past the audio: no phoneme


def test_piper_gives_a_phoneme_for_every_sample():
    audio, labels = piper_synth(1.0)("Pull the car over.")
    assert audio.dtype == np.float32 and len(labels) == len(audio) > 24_000 // 2
    spoken = set(labels[labels > 0].tolist())
    for word in ("pull", "car"):
        assert set(word_phonemes(word)) & spoken
    assert (labels > 0).mean() > 0.5
