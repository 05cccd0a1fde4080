"""End to end: 2 training voices x 3 sentences (+ held-out sentence and voice), real Whisper."""
import json

import soundfile as sf

from michi.data.corpus import load_bad_files, load_segments, text_fit_padding
from michi.data.synth import make_plan, run_synth


def test_synth_corpus_layout(synth_corpus, synth_args):
    segs = load_segments(synth_corpus)
    plan = make_plan(**synth_args)
    assert len(plan) == 2 * (3 + 1) + 1 and len(segs) == len(plan)
    assert {s["id"] for s in segs} == {it.id for it in plan}
    assert load_bad_files(synth_corpus) == []
    by_split = {}
    for s in segs:
        by_split.setdefault(s["split"], set()).add(s["speaker"])
        info = sf.info(str(synth_corpus / s["audio"]))
        assert (info.samplerate, info.channels, info.format, info.subtype) == (24000, 1, "FLAC", "PCM_16")
        assert abs(info.frames / 24000 - s["duration_s"]) < 1e-3
        assert " ".join(w for w, _, _ in s["words"]) == s["text"]
        starts = [w[1] for w in s["words"]]
        assert starts == sorted(starts)
        assert all(0.15 <= st <= en <= s["duration_s"] - 0.15 for _, st, en in s["words"])
        # Trimmed to ~0.2 s of leading silence (the end may be padded so that the text fits).
        assert s["words"][0][1] < 0.6
        assert text_fit_padding(s["words"], info.frames) == 0
        assert len(s["text"].encode()) / s["duration_s"] < 12.5
    assert by_split == {"train": {"flite-slt", "festival-kal"},
                        "heldout_sentence": {"flite-slt", "festival-kal"}, "heldout_voice": {"flite-awb"}}
    # Whisper reads these voices well: most known words matched exactly.
    assert sum(s["matched"] for s in segs) / len(segs) > 0.7
    info = json.loads((synth_corpus / "synth.json").read_text())
    assert info["stats"]["all"]["utterances"] == len(segs)


def test_rerun_does_nothing(synth_corpus, synth_args, snapshot, capsys):
    before = snapshot(synth_corpus)
    assert run_synth(synth_corpus, workers=2, **synth_args)
    assert snapshot(synth_corpus) == before
    assert "Did not run any tasks" in capsys.readouterr().out


def test_more_sentences_redo_only_the_changed_chunk(tmp_path, snapshot):
    args = dict(tts_voice="flite-slt", voices=["flite-slt"], heldout_voice=None, tts_sentences=2,
                sentences_per_voice=0, heldout_sentences=1)
    assert run_synth(tmp_path, workers=1, **args)
    before = snapshot(tmp_path / "work" / "synth" / "flite-slt")
    assert run_synth(tmp_path, workers=1, **{**args, "tts_sentences": 3})
    after = snapshot(tmp_path / "work" / "synth" / "flite-slt")
    assert after["heldout_sentence-0000.jsonl"] == before["heldout_sentence-0000.jsonl"]
    assert after["train-0000.jsonl"] != before["train-0000.jsonl"]
    segs = load_segments(tmp_path)
    assert sorted(s["split"] for s in segs) == ["heldout_sentence", "train", "train", "train"]
    # The first two sentences are the same as before: a voice's sentences are a stable prefix.
    first = [it.text for it in make_plan(**args) if it.split == "train"]
    assert first == [it.text for it in make_plan(**{**args, "tts_sentences": 3}) if it.split == "train"][:2]
