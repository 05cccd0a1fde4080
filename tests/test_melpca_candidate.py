"""The committed mel-PCA candidate (shared/weights/michi-tiny-melpca, issue 13): it loads as
trained with a fitted basis, and speaks a forced text through the in-process session."""
from pathlib import Path

import numpy as np

import michi
from michi.generate import tts

CANDIDATE = Path(michi.__file__).parent / "weights" / "michi-tiny-melpca"


def test_the_candidate_loads_trained_with_its_basis_and_speaks():
    m = michi.load(str(CANDIDATE))
    assert m.cfg.codec == "melpca" and m.cfg.latent_dim == 64
    assert m.trained and m.basis_fitted
    basis = m.model.basis
    gram = basis.components @ basis.components.T
    np.testing.assert_allclose(gram.numpy(), np.eye(64), atol=1e-4)  # fp32 basis, orthonormal
    out = tts(m, "Hello there.", continue_ticks=4, seed=0)
    audio = out.audio
    assert out.trained and out.text.startswith("Hello there.")  # the forced text was spoken
    assert len(audio) >= 1920 * 10
    assert np.isfinite(audio).all() and 1e-3 < float(np.sqrt(np.mean(np.square(audio)))) < 1.0
