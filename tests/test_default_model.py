"""The shipped default model: trained by this project's recipe, used unless told otherwise."""
import json

import michi
from michi.checkpoint import read_checkpoint_config
from michi.cli import main


def test_default_model_is_trained_and_loads():
    m = michi.load()
    assert m.trained and m.cfg.preset == "tiny"
    _, info = read_checkpoint_config(michi.DEFAULT_MODEL)
    assert info["what"].startswith("trained by michi's recipe")
    assert list(info["stages"]) == ["text", "codec", "vocoder", "speak", "joint"]
    # The shipped vocoder is the tiny preset's design (the iSTFT head), trained on the shipped encoder.
    assert m.cfg.vocoder == michi.config.tiny().vocoder


def test_model_card_names_the_shipped_weights():
    card = (michi.DEFAULT_MODEL / "MODEL_CARD.md").read_text()
    sha = json.loads((michi.DEFAULT_MODEL / "config.json").read_text())["weights"]["sha256"]
    assert sha[:16] in card  # the card describes these weights, not an older file


def test_cli_uses_the_default_model(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "michi-tiny" in out and "UNTRAINED" not in out
