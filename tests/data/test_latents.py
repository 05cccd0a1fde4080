"""Latents + shards from the small synthetic corpus with the random `tiny` preset."""
import json

import numpy as np

from michi.config import tiny
from michi.data.corpus import load_segments
from michi.data.latents import run_latents
from michi.data.shards import iter_utterances, load_manifest, read_shard


def test_latents_shards_and_rerun(synth_corpus, snapshot, capsys):
    assert run_latents(synth_corpus, "tiny", shard_size=4, workers=1)
    cfg = tiny()
    m = load_manifest(synth_corpus)
    segs = {s["id"]: s for s in load_segments(synth_corpus)}
    assert m["latent_dim"] == cfg.latent_dim and m["audio_delay_ticks"] == cfg.audio_delay_ticks
    assert m["model"]["preset"] == "tiny" and m["counts"]["failed"] == 0
    assert m["counts"]["utterances"] == len(segs)
    assert m["counts"]["splits"]["train"]["utterances"] == 6
    assert 5 < m["text"]["bytes_per_s_mean"] < 12.5
    assert m["text"]["dropped_tokens"] == 0  # the corpus padded every clip its text needs
    seen = set()
    for entry in m["shards"]:
        utts = read_shard(synth_corpus / entry["path"])
        assert len(utts) == entry["utterances"] <= 4
        assert sum(len(u.tokens) for u in utts) == entry["ticks"]
        for u in utts:
            seg = segs[u.id]
            assert u.split == entry["split"] == seg["split"] and u.speaker == seg["speaker"]
            n = -(-round(seg["duration_s"] * 24000) // 1920) + cfg.audio_delay_ticks
            assert u.latents.shape == (n, cfg.latent_dim) and u.tokens.shape == (n,)
            assert np.isfinite(u.latents).all()
            text_ids = [int(t) for t in u.tokens if t < 256]
            assert bytes(text_ids) == seg["text"].encode("utf-8")  # every byte, in order
            seen.add(u.id)
    assert seen == set(segs)
    assert {u.id for u in iter_utterances(synth_corpus, "heldout_voice")} == {
        i for i, s in segs.items() if s["split"] == "heldout_voice"}

    before = snapshot(synth_corpus)
    capsys.readouterr()
    assert run_latents(synth_corpus, "tiny", shard_size=4, workers=1)
    assert snapshot(synth_corpus) == before
    assert "Did not run any tasks" in capsys.readouterr().out
    # Another shard size is another plan: rebuilt, and the manifest says so.
    assert run_latents(synth_corpus, "tiny", shard_size=100, workers=1)
    m2 = load_manifest(synth_corpus)
    assert m2["key"]["shard_size"] == 100 and len({s["split"] for s in m2["shards"]}) == len(m2["shards"]) == 3
    assert json.loads((synth_corpus / "manifest.json").read_text())["counts"]["utterances"] == len(segs)


def test_changed_segment_rebuilds_only_its_shard(synth_corpus, tmp_path, snapshot):
    import shutil

    from michi.data.pipeline import write_jsonl_atomic

    corpus = tmp_path / "c"
    shutil.copytree(synth_corpus, corpus, ignore=shutil.ignore_patterns("shards", "manifest.json", "work"))
    assert run_latents(corpus, "tiny", shard_size=3, workers=1)
    segs = load_segments(corpus)
    target = sorted(s["id"] for s in segs if s["split"] == "train")[0]  # in shard-00000
    for s in segs:
        if s["id"] == target:
            s["speaker"] = "renamed"
    before = snapshot(corpus / "shards")
    write_jsonl_atomic(corpus / "segments.jsonl", segs)
    assert run_latents(corpus, "tiny", shard_size=3, workers=1)
    after = snapshot(corpus / "shards")
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {"shard-00000.safetensors", "shard-00000.json"}
    assert {u.id: u.speaker for u in read_shard(corpus / "shards/shard-00000.safetensors")}[target] == "renamed"
