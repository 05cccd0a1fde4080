"""Word timestamps for a KNOWN text from Whisper's (possibly wrong) words.

Whisper's words are matched to the known words with difflib on normalised tokens (lower case,
letters/digits/apostrophes; "soft-spoken" is two tokens). Matched words take Whisper's times;
words inside a substituted stretch share that stretch's time span in proportion to their length;
words Whisper missed are interpolated, also by length, between their neighbours' times (or the
speech region's edges). Results are clamped to the region and made monotonic, so every known
word gets a time even when Whisper heard nothing.

`align_known_words` works on one clip or on a pack of clips transcribed together (several clips
concatenated into one 30 s Whisper window, which costs one encoder pass instead of one per clip).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")

Word = tuple[str, float, float]


def tokens(text: str) -> list[str]:
    """Normalised tokens for matching (and WER): lower case, hyphens split, punctuation dropped."""
    return _TOKEN.findall(text.lower().replace("-", " ").replace("\u2019", "'"))


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(word edit distance, reference words) on normalised tokens; WER = errors / words."""
    r, h = tokens(ref), tokens(hyp)
    prev = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        cur = [i] + [0] * len(h)
        for j, hw in enumerate(h, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
        prev = cur
    return prev[-1], len(r)


@dataclass
class ClipWords:
    """One clip's result."""

    words: list[Word]  # the known words (text.split()) with start/end seconds in the clip
    matched: float  # fraction of known tokens Whisper got exactly
    asr_text: str  # Whisper's words that fell inside this clip


def align_known_words(texts: list[str], spans: list[tuple[float, float]], speech: list[tuple[float, float]],
                      whisper_words: list[Word]) -> list[ClipWords]:
    """Known words of each clip with times relative to the clip's start.

    texts: the known text of each clip (its words are `text.split()`, so " ".join(words) == text);
    spans: (start_s, end_s) of each clip in the transcribed audio;
    speech: (start_s, end_s) of the speech inside each clip, relative to the clip (the trimmed
      silence margins), used as anchors for interpolation;
    whisper_words: Whisper's (word, start_s, end_s) over the whole transcribed audio.
    """
    clip_words = [t.split() for t in texts]
    ref, ref_owner = _known_tokens(clip_words)
    hyp, hyp_t = _whisper_tokens(whisper_words)
    tok_t, exact = _match_tokens(ref, ref_owner, hyp, hyp_t, spans)

    out: list[ClipWords] = []
    pos = 0
    for c, words in enumerate(clip_words):
        n_tok = sum(len(tokens(w)) for w in words)
        idx = range(pos, pos + n_tok)
        pos += n_tok
        wt = _clip_word_times(words, idx, tok_t, ref_owner, spans[c], speech[c])
        c0, c1 = spans[c]
        matched = sum(exact[i] for i in idx) / max(1, n_tok)
        asr = " ".join(w for w, s, e in whisper_words if c0 <= (s + e) / 2 < c1)
        out.append(ClipWords([(w, round(s, 3), round(e, 3)) for w, (s, e) in zip(words, wt)], matched, asr))
    return out


def _known_tokens(clip_words: list[list[str]]) -> tuple[list[str], list[tuple[int, int]]]:
    """Known tokens of all clips, in order, each pointing back at its (clip, word)."""
    ref: list[str] = []
    ref_owner: list[tuple[int, int]] = []
    for c, words in enumerate(clip_words):
        for w_i, w in enumerate(words):
            for tok in tokens(w):
                ref.append(tok)
                ref_owner.append((c, w_i))
    return ref, ref_owner


def _whisper_tokens(whisper_words: list[Word]) -> tuple[list[str], list[tuple[float, float]]]:
    """Whisper tokens with times (a multi-token word shares its span by character count)."""
    hyp: list[str] = []
    hyp_t: list[tuple[float, float]] = []
    for w, s, e in whisper_words:
        toks = tokens(w)
        lens = [len(t) for t in toks]
        total, acc = sum(lens), 0
        for tok, n in zip(toks, lens):
            hyp.append(tok)
            hyp_t.append((s + (e - s) * acc / total, s + (e - s) * (acc + n) / total))
            acc += n
    return hyp, hyp_t


def _match_tokens(ref: list[str], ref_owner: list[tuple[int, int]], hyp: list[str],
                  hyp_t: list[tuple[float, float]], spans: list[tuple[float, float]],
                  ) -> tuple[list[tuple[float, float] | None], list[bool]]:
    """Times per known token: exact matches first, substitutions spread over their span."""
    tok_t: list[tuple[float, float] | None] = [None] * len(ref)
    exact = [False] * len(ref)
    sm = difflib.SequenceMatcher(None, ref, hyp, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            for k in range(i2 - i1):
                tok_t[i1 + k] = hyp_t[j1 + k]
                exact[i1 + k] = True
        elif op == "replace":
            clips = {ref_owner[i][0] for i in range(i1, i2)}
            s, e = hyp_t[j1][0], hyp_t[j2 - 1][1]
            # Only within one clip: a stretch across a clip boundary would bridge the gap.
            if len(clips) == 1 and _inside(s, e, spans[ref_owner[i1][0]]):
                _spread(tok_t, range(i1, i2), ref, s, e)
    return tok_t, exact


def _clip_word_times(words: list[str], idx: range, tok_t: list[tuple[float, float] | None],
                     ref_owner: list[tuple[int, int]], span: tuple[float, float],
                     speech: tuple[float, float]) -> list[tuple[float, float]]:
    """One clip's word times relative to the clip, every word given one (interpolated if need be)."""
    c0, c1 = span
    lo, hi = speech
    # Token times relative to the clip; out-of-clip times are dropped (re-interpolated).
    rel: list[tuple[float, float] | None] = []
    for i in idx:
        t = tok_t[i]
        if t is not None and c0 - 0.05 <= t[0] and t[1] <= c1 + 0.05:
            rel.append((min(max(t[0] - c0, lo), hi), min(max(t[1] - c0, lo), hi)))
        else:
            rel.append(None)
    # Word times = union of its tokens; words without tokens ("&") are interpolated too.
    owners = [ref_owner[i][1] for i in idx]
    wt: list[tuple[float, float] | None] = []
    for w_i in range(len(words)):
        ts = [rel[k] for k, o in enumerate(owners) if o == w_i and rel[k] is not None]
        wt.append((min(t[0] for t in ts), max(t[1] for t in ts)) if ts else None)
    return _interpolate(words, wt, lo, hi)


def _inside(s: float, e: float, span: tuple[float, float]) -> bool:
    return span[0] - 0.05 <= s and e <= span[1] + 0.05


def _spread(out: list, idx: range, ref: list[str], s: float, e: float) -> None:
    lens = [len(ref[i]) + 1 for i in idx]
    total, acc = sum(lens), 0
    for i, n in zip(idx, lens):
        out[i] = (s + (e - s) * acc / total, s + (e - s) * (acc + n) / total)
        acc += n


def _interpolate(words: list[str], wt: list[tuple[float, float] | None], lo: float,
                 hi: float) -> list[tuple[float, float]]:
    """Fill missing word times between known neighbours by character count; then monotonic."""
    n = len(words)
    res: list[tuple[float, float]] = list(wt)  # type: ignore[arg-type]
    i = 0
    while i < n:
        if res[i] is not None:
            i += 1
            continue
        j = i
        while j < n and res[j] is None:
            j += 1
        left = res[i - 1][1] if i > 0 else lo
        right = res[j][0] if j < n else hi
        if right < left:
            right = left
        lens = [len(w) + 1 for w in words[i:j]]
        total, acc = sum(lens), 0
        for k, ln in zip(range(i, j), lens):
            res[k] = (left + (right - left) * acc / total, left + (right - left) * (acc + ln) / total)
            acc += ln
        i = j
    # Monotonic starts (a word never starts before the previous one); end >= start.
    prev_s = lo
    fixed = []
    for s, e in res:
        s = max(s, prev_s)
        fixed.append((s, max(e, s)))
        prev_s = s
    return fixed
