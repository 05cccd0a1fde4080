"""Where a speaking model loses the words: teacher forcing against its own feedback.

    python -m michi.eval.feedback MODEL --latents RUN/latents [--split train] [--limit 10]

For utterances of a latent shard set (`michi data latents`, or a recipe run's `latents/`), the
judge (Whisper) transcribes four decodings of the same ticks:
- `real`: the utterance's own latents, through the model's decoder (the codec's ceiling);
- `teacher_forced`: each tick's latent sampled by the speak head while the backbone reads the
  real previous latents, text and phonemes (what training optimises);
- `own_feedback`: the same text and phoneme schedule, but the backbone reads the latents it
  sampled itself (inference, without its own pacing);
and reports each one's WER against the known text. A large gap between teacher forcing and own
feedback is exposure bias: the model leans on the fed-back latent. Writes a JSON report.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


@torch.inference_mode()
def decodings(model, utt, phones: np.ndarray, next_phone: np.ndarray, temperature: float,
              seed: int) -> dict[str, np.ndarray]:
    from ..train.stages import SequenceLosses

    bb, norm = model.backbone, model.latent_norm
    n, dim = utt.latents.shape
    real = torch.from_numpy(utt.latents)
    prev_tokens = torch.tensor(np.r_[bb.vocab.pad, utt.tokens[:-1]])
    user = SequenceLosses(model).silence_latents(n, "cpu")
    no_text = torch.full((n, 1), -1)
    phones, nxt = torch.from_numpy(phones), torch.from_numpy(next_phone)

    def hidden(prev: torch.Tensor, upto: int) -> torch.Tensor:
        fused = bb.embed_tick(prev_tokens[:upto], prev[:upto], user[:upto], no_text[:upto], phones[:upto], nxt[:upto])
        return bb(fused.view(1, upto, -1))[0]

    gen = torch.Generator().manual_seed(seed)
    teacher_prev = torch.cat([torch.zeros(1, dim), norm.normalize(real[:-1])])
    teacher = model.speak_head.sample(hidden(teacher_prev, n), noise=temperature * torch.randn(n, dim, generator=gen))
    own = torch.zeros(n, dim)
    for t in range(n):  # a full forward per tick: slow but plainly the same model as training's
        h = hidden(torch.cat([torch.zeros(1, dim), own[:t]]), t + 1)[-1:]
        own[t] = model.speak_head.sample(h, noise=temperature * torch.randn(1, dim, generator=gen))[0]
    decode = lambda lat: model.vocoder(lat[None])[0].float().numpy()  # noqa: E731
    return {"real": decode(real), "teacher_forced": decode(norm.denormalize(teacher)),
            "own_feedback": decode(norm.denormalize(own))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--latents", required=True, help="shard set (with manifest.json) made with this model's codec")
    ap.add_argument("--split", default="train")
    ap.add_argument("--speaker", default="piper-joe")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="eval_feedback.json")
    args = ap.parse_args(argv)

    import michi

    from ..train.batches import SequenceBank
    from .speech import WhisperJudge, spread
    from .wer import summary

    t0 = time.perf_counter()
    model = michi.load(args.model, device="cpu").model.eval()
    if not model.cfg.phone_width:
        raise SystemExit(f"{args.model}: no phoneme stream; this probe reads the phoneme schedule")
    bank = SequenceBank(args.latents, args.split, [args.speaker], pad_token=model.backbone.vocab.pad)
    picks = spread(list(range(len(bank.utterances))), args.limit)
    judge = WhisperJudge()
    rows: dict[str, list[dict]] = {"real": [], "teacher_forced": [], "own_feedback": []}
    for k, i in enumerate(picks):
        utt = bank.utterances[i]
        phones = bank.phone_stream(i, model.cfg.phone_frames)
        for name, audio in decodings(model, utt, phones, bank.next_phones[i], args.temperature, args.seed + k).items():
            rows[name].append({"id": utt.id, "ref": utt.text, "hyp": judge(audio, model.cfg.sample_rate_hz)})
        print(f"[feedback] {k + 1}/{len(picks)} {utt.text!r}: " + " | ".join(
            f"{name} {rows[name][-1]['hyp']!r}" for name in rows), flush=True)
    report = {"model": str(Path(args.model).resolve()), "latents": str(Path(args.latents).resolve()),
              "split": args.split, "speaker": args.speaker, "temperature": args.temperature,
              "results": {name: {**summary(r), "rows": r} for name, r in rows.items()},
              "wall_s": round(time.perf_counter() - t0, 1)}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(" ".join(f"{name} WER {100 * report['results'][name]['wer']:.1f} %" for name in rows) + f"; report: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
