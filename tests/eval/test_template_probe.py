"""The phoneme-label probe (`michi.eval.template_probe`): its features and its fit."""
import numpy as np

from michi.eval.template_probe import FRAMES_PER_TICK, LABELS, fit, frame_features
from michi.model.phonemes import FRAME_START


def test_the_ridge_fit_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, size=(4000, FRAMES_PER_TICK))
    x = frame_features(labels)
    assert x.shape == (4000, FRAMES_PER_TICK * LABELS + 1) and (x.sum(1) == FRAMES_PER_TICK + 1).all()
    w = rng.normal(size=(x.shape[1], 3))
    got, ticks = fit([(x[:2000], x[:2000] @ w), (x[2000:], x[2000:] @ w)])
    assert ticks == 4000
    assert np.abs(x @ got - x @ w).max() < 0.05 * np.abs(x @ w).max()


def test_frame_features_keep_position_phoneme_and_start():
    frames = np.array([[5] * 8, [5, 5, 5, 7 + FRAME_START, 7, 7, 7, 7]])
    x = frame_features(frames)
    assert x[0, 5] == 1 and x[0, 7 * LABELS + 5] == 1
    assert x[1, 3 * LABELS + 7 + FRAME_START] == 1 and x[1, 3 * LABELS + 7] == 0  # a start is its own column
    assert x[1, 4 * LABELS + 7] == 1
