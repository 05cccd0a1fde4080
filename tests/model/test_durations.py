"""The duration predictor and the queue it paces: phoneme lengths from piper's timings, frames laid
out from predicted lengths exactly, and a predictor that learns lengths from a corpus."""
import json

import numpy as np
import pytest
import torch

from michi.config import tiny_melpca
from michi.model.durations import DurationPredictor, phone_durations
from michi.model.michi import MichiModel
from michi.model.phonemes import FRAME_START, LEAD_FRAMES, NO_PHONE, FrameQueue, text_phonemes
from michi.model.tokenizer import ByteTokenizer
from michi.train.durations import DurationBank, DurationConfig, DurationStage, duration_errors
from michi.train.stages import OptimConfig


def test_timings_become_lengths_in_frames_and_silences_end_the_phoneme_before():
    phones = [[NO_PHONE, 0.0], [5, 0.10], [6, 0.13], [NO_PHONE, 0.30], [7, 0.45], [NO_PHONE, 0.52]]
    ids, frames = phone_durations(phones)
    assert ids.tolist() == [5, 6, 7]
    assert frames == pytest.approx([3.0, 17.0, 7.0])
    assert phone_durations([[5, 0.1]])[0].size == 0  # nothing after it: no length


def test_queue_lays_out_frames_from_the_lengths():
    """A phoneme sounds its length (fractions carried on); one shorter than half a frame is passed
    over, as in the training labels; after the last one, silence; the first waits LEAD_FRAMES."""
    ids = [i for w in text_phonemes("cat") for i in w]
    assert len(ids) == 4  # k, stress, ae, t
    lengths = [3.0, 0.3, 2.2, 4.5]
    q = FrameQueue(ByteTokenizer().decode, durations=lambda got: lengths if list(got) == ids else None)
    q.add_text("cat", forced=True)
    labels = []
    for _ in range(4):
        labels += q.next_tick()[0]
    k, ae, t = ids[0], ids[2], ids[3]
    S = FRAME_START
    want = [NO_PHONE] * LEAD_FRAMES + [k + S, k, k, ae + S, ae, ae, t + S, t, t, t, NO_PHONE + S]
    assert labels[:len(want)] == want
    assert set(labels[len(want):]) == {NO_PHONE} and q.forced == 0 and not q.queue
    # Text queued after LEAD_FRAMES of silence begins at once; after a shorter silence, it waits
    # for the rest of the lead.
    q.add_text("cat")
    labels = q.next_tick()[0] + q.next_tick()[0]  # "cat" (10 frames), then 6 of silence
    assert labels[0] == k + S and labels[10:] == [NO_PHONE + S] + [NO_PHONE] * 5
    q.add_text("cat")
    labels = q.next_tick()[0]
    assert labels[:LEAD_FRAMES - 6] == [NO_PHONE] * (LEAD_FRAMES - 6) and labels[LEAD_FRAMES - 6] == k + S


def test_predicted_frames_are_non_negative_and_one_per_phoneme():
    net = DurationPredictor(width=32).eval()
    out = net.frames([5, 6, 7, 8])
    assert len(out) == 4 and min(out) >= 0.0 and net.frames([]) == []
    # Padding past a row's end does not change a row's answer.
    a = net(torch.tensor([[5, 6, 7]]))[0]
    b = net(torch.tensor([[5, 6, 7, NO_PHONE, NO_PHONE]]))[0, :3]
    assert torch.allclose(a, b, atol=1e-6)


def _corpus(path, clips: int, seed: int) -> None:
    """Clips whose lengths follow a rule (by phoneme, longer before id 10, a full stop)."""
    rng = np.random.default_rng(seed)
    with open(path / "segments.jsonl", "a") as f:
        for n in range(clips):
            ids = list(rng.integers(11, 40, size=12)) + [10]
            t, phones = 0.2, [[NO_PHONE, 0.0]]
            for a, b in zip(ids, ids[1:] + [NO_PHONE]):
                phones.append([int(a), round(t, 3)])
                t += 0.01 * (2 + a % 7) * (2 if b == 10 else 1)
            phones.append([NO_PHONE, round(t, 3)])
            split = "train" if seed == 0 else "heldout_sentence"
            f.write(json.dumps({"id": f"c{seed}-{n}", "speaker": "v", "split": split, "phones": phones}) + "\n")


def test_the_durations_stage_learns_lengths_from_timings(tmp_path):
    _corpus(tmp_path, 200, seed=0)
    _corpus(tmp_path, 20, seed=1)
    model = MichiModel(tiny_melpca(), load_pretrained=False)
    model.durations = DurationPredictor(width=48)
    train, heldout = DurationBank(tmp_path, "train", ["v"]), DurationBank(tmp_path, "heldout_sentence")
    before = duration_errors(model.durations, heldout)
    stage = DurationStage(model, train, heldout, DurationConfig(batch_size=16, eval_every=50),
                          OptimConfig(lr=3e-3, warmup_steps=10))
    for step in range(300):
        stage.step(step)
    after = duration_errors(model.durations, heldout)
    assert before["phone_mae_frames"] > 2.0
    assert after["phone_mae_frames"] < 0.5 * before["phone_mae_frames"]
    assert after["length_error_pct"] < 10.0
    with pytest.raises(ValueError, match="no train clips"):
        DurationBank(tmp_path, "train", ["nobody"])


def test_the_engine_paces_forced_text_by_the_models_predictor():
    """A model with a duration predictor: forced text gets the predictor's lengths, and is spoken
    in about that many frames (random weights: plumbing, not quality)."""
    from michi.engine import BackboneEngine, TickInput

    torch.manual_seed(0)
    model = MichiModel(tiny_melpca(), load_pretrained=False).eval()
    with torch.no_grad():  # every phoneme 6 frames long
        model.durations.out.weight.zero_()
        model.durations.out.bias.fill_(float(np.log(7.0)))
    engine = BackboneEngine(model)
    engine.open("a")
    engine.force_text("a", list(b"the cat sat"))
    q = engine.rows[0].phonemes
    assert list(q.lengths) == pytest.approx([6.0] * len(q.queue))
    frames = sum(q.lengths)
    user = TickInput(torch.zeros(model.cfg.latent_dim))
    ticks = 0
    last = LEAD_FRAMES + round(frames) - 6  # the frame where the last phoneme begins
    while engine.phones_pending("a"):
        engine.tick({"a": user})
        ticks += 1
        assert ticks <= last // 8 + 1
    assert ticks == last // 8 + 1
