"""Probe: how well can a small CTC head spell from Whisper tiny.en's encoder frames?

    python -m michi.eval.whisper_probe --corpus data/hearing [--clips 4000] [--minutes 8] [--phones]
        [--window 3 --hop 0.32] [--out F]

Before making Whisper's encoder the listen text head's front (issue 15), measure what it gives:
each clip's encoder frames (`michi.train.hearing.attach_teacher`: the clip whole, both ways, 40 ms
averaged, so an upper bound for a chunked front), a head of one linear layer, one causal
transformer layer (`michi.model.listen.TransformerLayer`) and two byte slots per frame, trained by
CTC on `--clips` training clips (clean, no augmentation) for `--minutes`; then greedy CTC WER on
the held-out voice's clips and on training voices reading held-out sentences (`--phones`: the
texts' phonemes as targets, as the listen head's phoneme output learns them, and the greedy
phoneme error rate, to set beside the head's curve). Prints progress and
writes a JSON report.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TICK_S
from ..model.listen import TransformerLayer, collapse, emitted
from ..model.phonemes import NUM_PHONEME_IDS, ctc_phonemes
from ..model.tokenizer import load_tokenizer
from ..train.batches import AudioBank, load_segments
from ..train.hearing import Clip, attach_teacher, clips_from_bank
from .wer import ErrorCounts, align, summary

SLOTS = 2  # per 40 ms frame: 50 slots a second


class ProbeHead(torch.nn.Module):
    def __init__(self, width: int, vocab: int, dim: int = 256):
        super().__init__()
        self.inp = torch.nn.Linear(width, dim)
        self.layer = TransformerLayer(dim, 4, 125, alibi=True)
        self.out = torch.nn.Linear(dim, SLOTS * (vocab + 1))
        self.blank = vocab

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, n, width] -> log-probs [B, n * SLOTS, vocab + 1]."""
        h = self.layer(F.gelu(self.inp(frames)))
        b, n, _ = h.shape
        return self.out(h).view(b, n * SLOTS, -1).log_softmax(-1)


def _batch(clips: list[Clip], encode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(c.teacher) for c in clips)
    frames = torch.zeros(len(clips), n, clips[0].teacher.shape[1])
    for i, c in enumerate(clips):
        frames[i, :len(c.teacher)] = torch.from_numpy(c.teacher.astype(np.float32))
    tokens = [encode(c.text) for c in clips]
    return (frames, torch.tensor([len(c.teacher) * SLOTS for c in clips]),
            torch.tensor([t for row in tokens for t in row]), torch.tensor([len(t) for t in tokens]))


@torch.no_grad()
def greedy_wer(head: ProbeHead, clips: list[Clip], tokenizer, phones: bool = False) -> float:
    """Greedy CTC's WER over the clips (`phones`: the phoneme error rate against `ctc_phonemes`)."""
    rows, counts = [], ErrorCounts()
    for c in clips:
        best = head(torch.from_numpy(c.teacher.astype(np.float32))[None]).argmax(-1)
        tokens = emitted(collapse(best, torch.tensor([head.blank]), head.blank))
        if phones:
            counts += align(ctc_phonemes(c.text), tokens)
        else:
            rows.append({"ref": c.text, "hyp": tokenizer.decode(tokens)})
    return counts.wer if phones else summary(rows)["wer"]


def probe(corpus: str | Path, clips: int = 4000, minutes: float = 8.0, batch_size: int = 32,
          lr: float = 1e-3, eval_every: int = 100, steps: int | None = None, seed: int = 0,
          phones: bool = False, window_s: float | None = None, hop_s: float = 0.32, chunk: int | None = None,
          log=print) -> dict:
    """Train the probe for `minutes` (or `steps`, whichever ends first); the report as a dict.
    `phones`: the targets are the texts' phonemes (`ctc_phonemes`, as the listen head's phoneme
    output learns them) and the figure the greedy phoneme error rate. `window_s`: streaming
    frames (`michi.data.whisper.streaming_encoder_frames`: the encoder over the last `window_s`
    every `hop_s`) instead of whole clips; with `chunk`, block-causal frames
    (`michi.model.whisper_encoder`: blocks of `chunk` 20 ms frames, `window_s` of the past)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = load_tokenizer("bytes", 256)
    train_segments = load_segments(corpus, ("train",))
    pick = sorted(rng.choice(len(train_segments), min(clips, len(train_segments)), replace=False))
    train = clips_from_bank(AudioBank(corpus, [train_segments[i] for i in pick]))
    held = {split: clips_from_bank(AudioBank(corpus, segments))
            for split in ("heldout_voice", "heldout_sentence") if (segments := load_segments(corpus, (split,))[:40])}
    width = attach_teacher(train + [c for v in held.values() for c in v], TICK_S / 2, log=log,
                           window_s=window_s, hop_s=hop_s, chunk=chunk)
    train = [c for c in train if c.teacher is not None]
    head = ProbeHead(width, NUM_PHONEME_IDS if phones else 256)
    encode = ctc_phonemes if phones else tokenizer.encode
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    start, step, curve = time.monotonic(), 0, []
    while time.monotonic() - start < 60 * minutes and (steps is None or step < steps):
        frames, lengths, targets, target_lengths = _batch([train[i] for i in rng.integers(len(train), size=batch_size)],
                                                          encode)
        log_probs = head(frames)
        loss = F.ctc_loss(log_probs.transpose(0, 1), targets, lengths, target_lengths, blank=head.blank,
                          zero_infinity=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % eval_every == 0:
            wers = {k: greedy_wer(head.eval(), v, tokenizer, phones) for k, v in held.items()}
            head.train()
            curve.append({"step": step, "minutes": (time.monotonic() - start) / 60, "ctc": loss.item(), **wers})
            log(f"[whisper probe] step {step}, {curve[-1]['minutes']:.1f} min, ctc {loss.item():.3f}, "
                + ", ".join(f"{k} {'PER' if phones else 'WER'} {100 * v:.1f} %" for k, v in wers.items()))
    final = {k: greedy_wer(head.eval(), v, tokenizer, phones) for k, v in held.items()}
    return {"corpus": str(corpus), "train_clips": len(train), "minutes": minutes, "steps": step,
            "targets": "phonemes" if phones else "bytes",
            "frames": (f"block-causal: blocks of {chunk} frames, {window_s} s of the past" if chunk
                       else f"streaming: the last {window_s} s every {hop_s} s" if window_s else "whole clips"),
            "greedy_per" if phones else "greedy_wer": final,
            "curve": curve}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--clips", type=int, default=4000)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--phones", action="store_true", help="phoneme targets (greedy phoneme error rate)")
    ap.add_argument("--window", type=float, default=None,
                    help="streaming frames: the encoder over the last WINDOW seconds every --hop (default: whole clips)")
    ap.add_argument("--hop", type=float, default=0.32)
    ap.add_argument("--chunk", type=int, default=None,
                    help="block-causal frames (michi.model.whisper_encoder): blocks of CHUNK 20 ms frames, "
                         "--window seconds of the past")
    ap.add_argument("--out", default="whisper-probe.json")
    args = ap.parse_args(argv)
    report = probe(args.corpus, args.clips, args.minutes, phones=args.phones, window_s=args.window, hop_s=args.hop,
                   chunk=args.chunk)
    Path(args.out).write_text(json.dumps(report, indent=2))
    key = "greedy_per" if args.phones else "greedy_wer"
    print(f"{key}: {report[key]}; report: {args.out}")


if __name__ == "__main__":
    main()
