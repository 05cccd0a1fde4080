"""Latents + aligned text -> training shards (`michi data latents`).

For every segment of a corpus (`segments.jsonl`, `audio/`): read the 24 kHz audio, run the
model's listen encoder (`shards.extract_latents`: raw latents, audio delay prepended as silence),
place the words' tokens on the ticks (`align.align_words`: text leads audio) and keep an
`Utterance`. Utterances are written to `shards/shard-NNNNN.safetensors` (`shards.write_shard`).

Splits live in separate shards: the segments of each split ("train", "heldout_sentence",
"heldout_voice"), sorted by id, are cut into shards of `shard_size`; shards are numbered across
splits in that order, and each manifest entry names its split (so `iter_utterances(dir, split)`
reads only that split's shards).

One Luigi task per shard. Its output is a sidecar `shards/shard-NNNNN.json` (model fingerprint,
digest of its segments' records, stats), written after the shard: a shard whose sidecar matches
the current model and segment records is finished and never redone; otherwise it is rebuilt.
`LatentsManifest` then writes `manifest.json`: latent_dim, model (source, preset, sha256,
trained), audio_delay_ticks, counts per split, per-shard split/utterances/ticks, text bytes per
second stats, failures.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from ..config import FRAME_RATE_HZ, SAMPLE_RATE_HZ
from .corpus import SPLITS, load_segments
from .pipeline import Progress, luigi, write_json_atomic

SHARD_DIR = "shards"


def model_fingerprint(source: str) -> dict:
    """What identifies the encoder: a checkpoint's weights SHA-256, or a preset + seed."""
    from ..checkpoint import CONFIG_FILE, read_checkpoint_config
    from .shards import SHARD_FORMAT

    path = Path(source)
    if (path / CONFIG_FILE).is_file():
        cfg, info = read_checkpoint_config(path)
        return {"source": str(path.resolve()), "preset": cfg.preset, "sha256": info.get("sha256"),
                "trained": bool(info.get("trained")), "latent_dim": cfg.latent_dim,
                "audio_delay_ticks": cfg.audio_delay_ticks, "tokenizer": cfg.backbone.tokenizer,
                "vocab_size": cfg.backbone.vocab_size, "format": SHARD_FORMAT}
    if path.exists():
        raise FileNotFoundError(f"{path} is not a Michi checkpoint directory (no {CONFIG_FILE})")
    from ..config import preset

    cfg = preset(source)  # raises on an unknown name
    return {"source": source, "preset": cfg.preset, "sha256": None, "trained": False,
            "weights": "random init, seed 0", "latent_dim": cfg.latent_dim,
            "audio_delay_ticks": cfg.audio_delay_ticks, "tokenizer": cfg.backbone.tokenizer,
            "vocab_size": cfg.backbone.vocab_size, "format": SHARD_FORMAT}


def shard_plan(segments: list[dict], shard_size: int) -> list[tuple[str, list[str]]]:
    """(split, segment ids) per shard, in shard-number order."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    plan = []
    for split in SPLITS:
        ids = sorted(s["id"] for s in segments if s["split"] == split)
        plan += [(split, ids[k:k + shard_size]) for k in range(0, len(ids), shard_size)]
    return plan


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _records_digest(records: list[dict]) -> str:
    """Identifies segment records (ids, text, words, durations...): a shard built from other
    records, e.g. after the corpus was rebuilt or padded, is stale."""
    return hashlib.sha1("\n".join(json.dumps(r, sort_keys=True) for r in records).encode()).hexdigest()


class LatentShard(luigi.Task):
    corpus = luigi.Parameter()
    model = luigi.Parameter()
    index = luigi.IntParameter()
    split = luigi.Parameter()
    ids = luigi.ListParameter(significant=False, visibility=luigi.parameter.ParameterVisibility.PRIVATE)
    segments_sha1 = luigi.Parameter()  # of these segments' records: text, words, duration...
    fingerprint_json = luigi.Parameter()
    threads = luigi.IntParameter(default=1, significant=False)
    device = luigi.Parameter(default="cpu", significant=False)

    def output(self):
        return luigi.LocalTarget(str(Path(self.corpus) / SHARD_DIR / f"{shard_name(self.index)}.json"))

    def complete(self):
        if not self.output().exists():
            return False
        try:
            side = json.loads(Path(self.output().path).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return (side.get("model") == json.loads(self.fingerprint_json)
                and side.get("segments_sha1") == self.segments_sha1
                and (not side.get("path") or (Path(self.corpus) / side["path"]).is_file()))

    def run(self):
        import torch

        from ..api import load
        from ..audio.io import read_wav
        from .shards import encode_segment, write_shard

        torch.set_num_threads(max(1, self.threads))
        michi = load(self.model, device=self.device)
        model = michi.model
        corpus = Path(self.corpus)
        wanted = set(self.ids)
        segs = {s["id"]: s for s in load_segments(corpus) if s["id"] in wanted}
        utts, bad = [], []
        st = {"ticks": 0, "text_tokens": 0, "late_ticks": 0, "dropped_tokens": 0, "seconds": 0.0,
              "text_bytes": 0, "bytes_per_s": []}
        for seg_id in self.ids:
            seg = segs.get(seg_id)
            try:
                if seg is None:
                    raise ValueError("segment no longer in segments.jsonl")
                pcm, rate = read_wav(corpus / seg["audio"])
                if rate != SAMPLE_RATE_HZ:
                    raise ValueError(f"audio is {rate} Hz, the corpus contract is {SAMPLE_RATE_HZ} Hz")
                utt, a = encode_segment(model, michi.tokenizer, michi.vocab, seg, pcm)
            except Exception as e:  # noqa: BLE001 - one bad segment must not stop the shard
                bad.append({"input": str(corpus / (seg or {}).get("audio", seg_id)), "id": seg_id,
                            "reason": f"latents: {type(e).__name__}: {e}"})
                continue
            utts.append(utt)
            n = len(utt.tokens)
            secs = len(pcm) / SAMPLE_RATE_HZ
            nbytes = len(seg["text"].encode("utf-8"))
            st["ticks"] += n
            st["text_tokens"] += a.get("tokens", 0)
            st["late_ticks"] += a.get("late_ticks", 0)
            st["dropped_tokens"] += a.get("dropped", 0)
            st["seconds"] += secs
            st["text_bytes"] += nbytes
            st["bytes_per_s"].append(round(nbytes / secs, 3))
        name = shard_name(self.index)
        rel = f"{SHARD_DIR}/{name}.safetensors"
        if utts:
            write_shard(corpus / rel, utts)
        # A shard none of whose segments could be read has no file; its sidecar keeps the failures.
        side = {"path": rel if utts else "", "split": self.split, "utterances": len(utts),
                "model": json.loads(self.fingerprint_json), "segments_sha1": self.segments_sha1,
                "stats": st, "bad": bad}
        write_json_atomic(self.output().path, side)
        Progress(corpus / "work" / "latents" / "progress.json").report()


class LatentsManifest(luigi.Task):
    corpus = luigi.Parameter()
    model = luigi.Parameter()
    shard_size = luigi.IntParameter()
    # Identify the inputs, so that Luigi's per-process task cache never hands back a task (and
    # its cached plan) built for other segments or weights.
    segments_sha1 = luigi.Parameter()
    fingerprint_json = luigi.Parameter()
    threads = luigi.IntParameter(default=1, significant=False)
    device = luigi.Parameter(default="cpu", significant=False)

    def _setup(self):
        if not hasattr(self, "_cached"):
            segs = load_segments(self.corpus)
            fp = json.loads(self.fingerprint_json)
            if _records_digest(segs) != self.segments_sha1:
                raise RuntimeError(f"{self.corpus}: segments.jsonl changed while the pipeline was running")
            self._cached = (segs, fp, shard_plan(segs, self.shard_size))
        return self._cached

    def requires(self):
        segs, fp, plan = self._setup()
        fpj = json.dumps(fp, sort_keys=True)
        by_id = {s["id"]: s for s in segs}
        return [LatentShard(corpus=self.corpus, model=self.model, index=i, split=split, ids=ids,
                            segments_sha1=_records_digest([by_id[i] for i in ids]), fingerprint_json=fpj,
                            threads=self.threads, device=self.device)
                for i, (split, ids) in enumerate(plan)]

    def output(self):
        from .shards import MANIFEST_FILE

        return luigi.LocalTarget(str(Path(self.corpus) / MANIFEST_FILE))

    def _key(self) -> dict:
        segs, fp, plan = self._setup()
        return {"model": fp, "shard_size": self.shard_size, "segments_sha1": _records_digest(segs)}

    def complete(self):
        if not self.output().exists():
            return False
        try:
            doc = json.loads(Path(self.output().path).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return doc.get("key") == self._key() and all(t.complete() for t in self.requires())

    def run(self):
        from .shards import SHARD_FORMAT, write_manifest

        segs, fp, plan = self._setup()
        shards, bad = [], []
        per_split: dict[str, dict] = {}
        tot = {"ticks": 0, "text_tokens": 0, "late_ticks": 0, "dropped_tokens": 0, "seconds": 0.0,
               "text_bytes": 0}
        bps: list[float] = []
        for target in self.input():
            side = json.loads(Path(target.path).read_text())
            bad += side["bad"]
            s = side["stats"]
            if side["utterances"]:
                shards.append({"path": side["path"], "split": side["split"], "utterances": side["utterances"],
                               "ticks": s["ticks"], "hours": round(s["seconds"] / 3600, 4)})
            sp = per_split.setdefault(side["split"], {"shards": 0, "utterances": 0, "ticks": 0, "hours": 0.0})
            sp["shards"] += bool(side["utterances"])
            sp["utterances"] += side["utterances"]
            sp["ticks"] += s["ticks"]
            sp["hours"] = round(sp["hours"] + s["seconds"] / 3600, 4)
            for k in tot:
                tot[k] += s[k]
            bps += s["bytes_per_s"]
        arr = np.array(bps) if bps else np.zeros(1)
        doc = {
            "format": SHARD_FORMAT,
            "key": self._key(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "latent_dim": fp["latent_dim"],
            "audio_delay_ticks": fp["audio_delay_ticks"],
            "frame_rate_hz": FRAME_RATE_HZ,
            "sample_rate_hz": SAMPLE_RATE_HZ,
            "tokenizer": fp["tokenizer"],
            "vocab_size": fp["vocab_size"],
            "model": fp,
            "splits_in_separate_shards": True,
            "counts": {"segments": len(segs), "utterances": sum(s["utterances"] for s in shards),
                       "failed": len(bad), "splits": per_split},
            "text": {
                "bytes_per_s_mean": round(tot["text_bytes"] / tot["seconds"], 3) if tot["seconds"] else 0.0,
                "bytes_per_s_p50": round(float(np.percentile(arr, 50)), 3),
                "bytes_per_s_p95": round(float(np.percentile(arr, 95)), 3),
                "bytes_per_s_max": round(float(arr.max()), 3),
                "max_bytes_per_s_at_one_per_tick": FRAME_RATE_HZ,
                "text_tokens": tot["text_tokens"], "ticks": tot["ticks"],
                "late_ticks_per_token": round(tot["late_ticks"] / max(1, tot["text_tokens"]), 4),
                "dropped_tokens": tot["dropped_tokens"],
            },
            "shards": shards,
            "bad": bad,
        }
        write_manifest(self.corpus, doc)


def run_latents(corpus: str | Path, model: str = "tiny", shard_size: int = 512, workers: int = 1,
                device: str = "cpu", verbose: bool = False) -> bool:
    from .pipeline import build

    corpus = Path(corpus).resolve()
    segs = load_segments(corpus)
    plan = shard_plan(segs, shard_size)
    units = {str(corpus / SHARD_DIR / f"{shard_name(i)}.json"): len(ids) for i, (_, ids) in enumerate(plan)}
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    fp = model_fingerprint(str(model))
    task = LatentsManifest(corpus=str(corpus), model=str(model), shard_size=shard_size,
                           segments_sha1=_records_digest(segs), fingerprint_json=json.dumps(fp, sort_keys=True),
                           threads=threads, device=device)
    if not task.complete():
        # Sidecars of another model or segment list are stale: remove them (their shards are
        # about to be rebuilt) so that progress counts only real work.
        for t in task.requires():
            if t.output().exists() and not t.complete():
                Path(t.output().path).unlink()
        Progress(corpus / "work" / "latents" / "progress.json").start("latents", units)
    t0 = time.time()
    ok = build([task], workers=workers, verbose=verbose)
    if ok:
        from .shards import load_manifest

        m = load_manifest(corpus)
        for split, c in m["counts"]["splits"].items():
            print(f"{split:<18} {c['utterances']:>6} utterances {c['ticks']:>8} ticks {c['hours']:.3f} h "
                  f"in {c['shards']} shards")
        t = m["text"]
        print(f"latent_dim {m['latent_dim']}, delay {m['audio_delay_ticks']} ticks; text {t['bytes_per_s_mean']} "
              f"bytes/s (p95 {t['bytes_per_s_p95']}), late ticks/token {t['late_ticks_per_token']}, "
              f"dropped tokens {t['dropped_tokens']}; failed segments: {m['counts']['failed']}")
        print(f"manifest: {corpus / 'manifest.json'} ({time.time() - t0:.0f} s)")
    return ok
