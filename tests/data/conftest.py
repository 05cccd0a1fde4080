"""Shared fixtures: one small synthetic corpus (real voices, real Whisper) for the data tests."""
from __future__ import annotations

from pathlib import Path

import pytest

SYNTH_ARGS = dict(tts_voice="flite-slt", voices=["flite-slt", "festival-kal"], heldout_voice="flite-awb",
                  tts_sentences=3, sentences_per_voice=3, heldout_sentences=1)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with (mtime_ns, size): equal snapshots = nothing written."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def snapshot():
    return _snapshot


@pytest.fixture
def synth_args():
    return dict(SYNTH_ARGS)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    from michi.data.synth import run_synth

    out = tmp_path_factory.mktemp("synth") / "corpus"
    assert run_synth(out, workers=2, **SYNTH_ARGS)
    return out
