"""Text evaluation of a language model: held-out perplexity, and the scoring primitive
(log-probability of a continuation given a context) that the reasoning harness builds on.

Two kinds of model are read through one adapter, `TextLM`:

- a Michi model (checkpoint directory or preset, `michi.load`): its backbone as a plain LM on
  text-only positions. A sequence starts with the BOS stream token, as every text-only insertion
  does (`api.text_positions`). Probabilities are over the distribution the backbone samples text
  from at text-only positions (`BackboneEngine.generate_text`): the base vocabulary plus EOS; the
  PAD / EPAD / BOS stream tokens only belong to tick positions and are masked out.
- a local Hugging Face causal LM directory (AutoModelForCausalLM + AutoTokenizer, never
  downloads). Sequences start with the tokenizer's BOS token when it has one (OLMo's in-loop
  evaluation does the same); without a BOS, an empty context is the EOS token (lm-evaluation-
  harness' convention).

Perplexity is reported per token (only comparable between models with the same tokenizer) and per
UTF-8 byte (bits per byte, comparable across tokenizers). `compare_perplexity` puts a jointly
trained Michi backbone next to a text-only baseline trained on the same budget and reports the ratio
(target <= 1.10).
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

LN2 = math.log(2)
DEFAULT_MAX_LENGTH = 2048  # context cap unless the caller asks for more (and the model allows it)
SELECTION_SEED = 1234  # OLMES' random_subsample_seed: `--limit N` picks the same items everywhere
PPL_RATIO_TARGET = 1.10


@dataclass
class Score:
    """Log-likelihood (nats) of a continuation, whether greedy decoding reproduces it exactly, and
    how many tokens were scored."""

    logprob: float
    greedy: bool
    tokens: int


class Progress:
    """A line on stderr every `every` seconds (and a last one), for runs that take minutes."""

    def __init__(self, label: str, total: int, unit: str = "tokens", every: float = 10.0,
                 enabled: bool = True):
        self.label, self.total, self.unit, self.every, self.enabled = label, total, unit, every, enabled
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every and self.done < self.total:
            self.last = now
            self._print(now)

    def close(self) -> None:
        if self.enabled and time.perf_counter() - self.start >= self.every:
            self._print(time.perf_counter())

    def _print(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(f"[{self.label}] {self.done}/{self.total} {self.unit} ({100 * self.done / max(1, self.total):.0f} %, "
              f"{rate:.0f} {self.unit}/s, {elapsed:.0f} s elapsed, ~{eta:.0f} s left)",
              file=sys.stderr, flush=True)


# ---- the adapter ----------------------------------------------------------------------------------
class TextLM:
    """A causal LM seen as text in, log-probabilities out.

    Subclasses set `name`, `kind`, `max_length` (the most input positions one forward reads),
    `prefix` (tokens every sequence starts with), `empty_context` (what stands for an empty context
    when there is no prefix), `vocab_size` (size of the scored distribution), `device`, and
    implement `encode`, `decode`, `identity` and `_logits`."""

    name: str = "lm"
    kind: str = "lm"
    max_length: int = DEFAULT_MAX_LENGTH
    prefix: list[int] = []
    empty_context: list[int] = []
    vocab_size: int = 0
    device: torch.device = torch.device("cpu")
    pad_id: int = 0
    batch_tokens: int = 4096  # padded input positions per forward

    # -- text <-> tokens --
    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def tokenizer_id(self) -> str:
        """Two models with the same tokenizer_id tokenise text the same way."""
        raise NotImplementedError

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens as lm-evaluation-harness makes them: trailing spaces of the
        context move to the continuation, the whole string is encoded at once and split after the
        context's own tokens (so the boundary tokens are what the model would really read). When
        the whole string does not start with the context's tokens (a merge across the boundary),
        the continuation is encoded on its own."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.encode(context) if context else []
        whole = self.encode(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.encode(continuation)

    # -- scoring --
    def logprobs(self, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> float:
        """Sum of log-probabilities (nats) of `continuation_ids` given `context_ids` (the prefix
        token is added in front; the sequence is truncated from the left to `max_length`)."""
        return self.score([(context_ids, continuation_ids)], progress=False)[0].logprob

    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], progress: bool | str = False
              ) -> list[Score]:
        """Batched `logprobs` of many (context_ids, continuation_ids), with greedy-match flags."""
        items = []
        for ctx, cont in requests:
            cont = list(cont)
            if not cont:
                raise ValueError("empty continuation: nothing to score")
            head = list(self.prefix) + list(ctx)
            if not head:
                head = list(self.empty_context)
            if not head:
                raise ValueError(f"{self.name}: an empty context and no BOS/EOS token to stand for it; "
                                 f"the first continuation token cannot be scored")
            items.append((head + cont, len(cont)))
        return self.score_sequences(items, progress)

    def score_sequences(self, items: Sequence[tuple[Sequence[int], int]], progress: bool | str = False
                        ) -> list[Score]:
        """The core: for each (sequence, n), the log-likelihood of the last n tokens of the sequence,
        each predicted from all tokens before it. Sequences longer than max_length + 1 lose their
        oldest tokens (and n is capped so that every scored token has at least one before it).
        Rows are sorted by length (longest first: memory trouble shows at once) and batched by
        `batch_tokens` padded positions; right padding needs no mask in a causal LM."""
        prepared = []
        for seq, n in items:
            seq = list(seq)[-(self.max_length + 1):]
            if len(seq) < 2 or n < 1:
                raise ValueError("a scored sequence needs at least one token of context and one to score")
            prepared.append((seq, min(n, len(seq) - 1)))
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
        results: list[Score | None] = [None] * len(prepared)
        bar = Progress(progress if isinstance(progress, str) else self.name,
                       sum(n for _, n in prepared), "tokens", enabled=bool(progress))
        i = 0
        with torch.inference_mode():
            while i < len(order):
                longest = len(prepared[order[i]][0]) - 1
                batch = order[i:i + max(1, self.batch_tokens // longest)]
                i += len(batch)
                for j, score in zip(batch, self._score_batch([prepared[j] for j in batch])):
                    results[j] = score
                bar.update(sum(prepared[j][1] for j in batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _score_batch(self, rows: list[tuple[list[int], int]]) -> list[Score]:
        inputs = [seq[:-1] for seq, _ in rows]
        width = max(len(x) for x in inputs)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for r, x in enumerate(inputs):
            ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        lengths = torch.tensor([len(x) for x in inputs])
        # Logits at input position p predict token p + 1: row r's targets (its last n tokens) come
        # from positions len_r - n ... len_r - 1. Only the last `keep` positions get logits.
        starts = [len(x) - n for x, (_, n) in zip(inputs, rows)]
        keep = width - min(starts)
        logits = self._logits(ids.to(self.device), lengths, keep)  # [B, keep, V]
        out = []
        for r, (seq, n) in enumerate(rows):
            s = starts[r] - (width - keep)
            logp = F.log_softmax(logits[r, s:s + n].float(), dim=-1)
            target = torch.tensor(seq[-n:], device=logp.device)
            token_lp = logp.gather(-1, target[:, None])[:, 0]
            greedy = bool((logp.argmax(-1) == target).all())
            out.append(Score(float(token_lp.sum()), greedy, n))
        return out

    def _logits(self, ids: torch.Tensor, lengths: torch.Tensor, keep: int) -> torch.Tensor:
        """ids [B, L] right-padded (real lengths `lengths`) -> logits [B, keep, V] of the last `keep`
        positions, over the scored distribution (target ids index it directly)."""
        raise NotImplementedError


def _batch_tokens_for(vocab: int, device: torch.device) -> int:
    """Padded positions per forward: bounded by compute on a CPU and by the [B, L, V] logits."""
    logits_budget = (2 ** 28 if device.type == "cpu" else 2 ** 30) // max(1, vocab)
    return int(max(512, min(logits_budget, 4096 if device.type == "cpu" else 32768)))


class MichiTextLM(TextLM):
    """A Michi backbone on text-only positions: [BOS] + text tokens."""

    kind = "michi"

    def __init__(self, michi: Any, name: str = "michi", max_length: int | None = None):
        self.michi = michi
        self.backbone = michi.model.backbone
        self.vocab = michi.vocab
        self.tokenizer = michi.tokenizer
        self.name = name
        self.device = michi.device
        self.max_length = min(michi.cfg.backbone.max_positions, max_length or DEFAULT_MAX_LENGTH)
        self.prefix = [self.vocab.bos]
        self.empty_context = []
        self.vocab_size = self.vocab.base + 1  # base vocabulary + EOS
        self.batch_tokens = _batch_tokens_for(self.vocab_size, self.device)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def tokenizer_id(self) -> str:
        return f"michi:{self.michi.cfg.backbone.tokenizer}:{self.vocab.base}"

    def identity(self) -> dict[str, Any]:
        info = self.michi.info
        b = self.michi.cfg.backbone
        return {
            "name": self.name, "kind": "michi", "preset": self.michi.cfg.preset,
            "trained": bool(info.get("trained")),
            "weights": info.get("weights") or info.get("note"), "sha256": info.get("sha256"),
            "backbone_parameters": sum(p.numel() for p in self.backbone.parameters()),
            "tokenizer": b.tokenizer, "base_vocab": b.vocab_size, "scored_vocab": self.vocab_size,
            "max_length": self.max_length, "device": str(self.device),
            "dtype": str(next(self.backbone.parameters()).dtype).replace("torch.", ""),
        }

    def _logits(self, ids: torch.Tensor, lengths: torch.Tensor, keep: int) -> torch.Tensor:
        bb = self.backbone
        hidden = bb(bb.embed_text(ids))[:, -keep:]
        logits = bb.text_logits(hidden)
        base, eos = self.vocab.base, self.vocab.eos
        return torch.cat([logits[..., :base], logits[..., eos:eos + 1]], dim=-1)


class HFTextLM(TextLM):
    """A local Hugging Face causal LM directory."""

    kind = "hf"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None,
                 max_length: int | None = None, name: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = Path(path)
        self.name = name or str(path)
        self.device = torch.device(device)
        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        torch_dtype = getattr(torch, dtype) if dtype else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.config = self.model.config
        limit = getattr(self.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
        self.max_length = min(int(limit), max_length or DEFAULT_MAX_LENGTH)
        bos, eos = self.tok.bos_token_id, self.tok.eos_token_id
        self.prefix = [bos] if bos is not None else []
        self.empty_context = [eos] if eos is not None else []
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else (eos or 0)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.batch_tokens = _batch_tokens_for(self.vocab_size, self.device)
        self._keep_ok = True

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def tokenizer_id(self) -> str:
        return f"hf:{self.tok.name_or_path}:{len(self.tok)}"

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": "hf", "path": str(self.path.resolve()),
            "model_type": getattr(self.config, "model_type", None),
            "architectures": getattr(self.config, "architectures", None),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "tokenizer_vocab": len(self.tok), "scored_vocab": self.vocab_size,
            "bos_prefix": bool(self.prefix), "max_length": self.max_length, "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
        }

    def _logits(self, ids: torch.Tensor, lengths: torch.Tensor, keep: int) -> torch.Tensor:
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long().to(ids.device)
        if self._keep_ok:
            try:
                return self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
            except TypeError:  # an architecture without logits_to_keep
                self._keep_ok = False
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -keep:]


def load_text_lm(source: str | Path | TextLM, device: str | torch.device = "cpu", dtype: str | None = None,
                 max_length: int | None = None, seed: int = 0) -> TextLM:
    """"default" (the shipped model), a Michi checkpoint directory, a Michi preset name (random
    weights, seeded) or a local Hugging Face causal-LM directory -> TextLM."""
    if isinstance(source, TextLM):
        return source
    from ..api import resolve_source
    from ..checkpoint import CONFIG_FILE, FORMAT
    from ..config import PRESETS

    path = Path(resolve_source(source))
    cfg_file = path / CONFIG_FILE
    if cfg_file.is_file():
        try:
            doc = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
        if isinstance(doc, dict) and doc.get("format") == FORMAT:
            return _michi_lm(str(path), device, dtype, max_length, seed, name=str(source))
        return HFTextLM(path, device=device, dtype=dtype, max_length=max_length, name=str(source))
    if path.exists():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: neither a Michi checkpoint nor a Hugging Face "
                                f"model directory")
    if str(source) in PRESETS:
        return _michi_lm(str(source), device, dtype, max_length, seed, name=str(source))
    raise FileNotFoundError(f"{source}: not a Michi checkpoint, a Hugging Face model directory or a preset "
                            f"({', '.join(sorted(PRESETS))})")


def _michi_lm(source: str, device: Any, dtype: str | None, max_length: int | None, seed: int,
              name: str) -> MichiTextLM:
    from ..api import load

    michi = load(source, device=str(device), seed=seed)
    if dtype:
        michi.model.backbone.to(getattr(torch, dtype))
    return MichiTextLM(michi, name=name, max_length=max_length)


# ---- selection ------------------------------------------------------------------------------------
def select_indices(n: int, limit: int | None, seed: int = SELECTION_SEED) -> list[int]:
    """Deterministic subset: the first `limit` of a seeded shuffle of range(n), returned in their
    original order. Nested: the items of --limit 10 include those of --limit 2."""
    if limit is None or limit >= n:
        return list(range(n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:max(0, limit)])


def limit_bytes(texts: Iterable[str], max_bytes: int | None) -> list[str]:
    """The texts, in order, up to `max_bytes` UTF-8 bytes in all (the last one cut at a character)."""
    texts = list(texts)
    if max_bytes is None:
        return texts
    out, left = [], max_bytes
    for t in texts:
        if left <= 0:
            break
        b = t.encode("utf-8")
        if len(b) > left:  # the last one: cut at a character boundary
            t = b[:left].decode("utf-8", errors="ignore")
            if t:
                out.append(t)
            break
        out.append(t)
        left -= len(b)
    return out


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


# ---- perplexity -----------------------------------------------------------------------------------
def perplexity(lm: TextLM, texts: Iterable[str], max_tokens: int | None = None, max_length: int | None = None,
               stride: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Perplexity of `lm` on documents.

    Each document is scored from its first token (predicted from the prefix token: BOS) to its
    last; a document longer than the context is cut into windows that each score `stride` new
    tokens (default: the context length) with as many earlier tokens as fit in the context before
    them (so with the default, a full later window's first token sees only its predecessor, as in
    lm-evaluation-harness' rolling log-likelihood; a smaller stride gives more context at more
    cost). Every token is scored exactly once.
    `max_tokens` stops after that many scored tokens (the last document cut at a token).

    Returns nats per token, token perplexity (comparable only under the same tokenizer), bits per
    byte and byte perplexity (per UTF-8 byte of the scored text: comparable across tokenizers)."""
    start = time.perf_counter()
    length = min(max_length or lm.max_length, lm.max_length)
    stride = min(stride or length, length)
    head = list(lm.prefix) or list(lm.empty_context)
    items: list[tuple[list[int], int]] = []
    n_docs = n_bytes = n_tokens = 0
    budget = max_tokens
    for text in texts:
        ids = lm.encode(text)
        if not ids:
            continue
        text_bytes = len(text.encode("utf-8"))
        first = 0 if head else 1  # no BOS/EOS: the first token can only be context
        if budget is not None and len(ids) - first > budget:
            ids = ids[: first + budget]
            text_bytes = len(lm.decode(ids).encode("utf-8"))
        if first:
            text_bytes -= len(lm.decode(ids[:1]).encode("utf-8"))
        if len(ids) <= first:
            continue
        for s in range(first, len(ids), stride):
            e = min(s + stride, len(ids))
            if len(head) + e <= length + 1 and not first:  # the whole document so far fits: from BOS
                items.append((head + ids[:e], e - s))
            else:
                items.append((ids[max(0, e - length - 1):e], e - s))
        n_docs += 1
        n_bytes += text_bytes
        n_tokens += len(ids) - first
        if budget is not None:
            budget -= len(ids) - first
            if budget <= 0:
                break
    if not items:
        raise ValueError("no text to score (every document empty?)")
    scores = lm.score_sequences(items, progress=f"perplexity {lm.name}" if progress else False)
    nll = -sum(s.logprob for s in scores)
    assert sum(s.tokens for s in scores) == n_tokens, "windows must score every token exactly once"
    return {
        "model": lm.name, "documents": n_docs, "tokens": n_tokens, "bytes": n_bytes,
        "nll_nats": nll, "nats_per_token": nll / n_tokens, "token_perplexity": _exp(nll / n_tokens),
        "bits_per_byte": nll / n_bytes / LN2, "byte_perplexity": _exp(nll / n_bytes),
        "bytes_per_token": n_bytes / n_tokens, "max_length": length, "stride": stride,
        "tokenizer": lm.tokenizer_id(), "seconds": round(time.perf_counter() - start, 3),
    }


def compare_perplexity(model_a: TextLM | str, model_b: TextLM | str, texts: Iterable[str],
                       max_bytes: int | None = None, target: float = PPL_RATIO_TARGET, device: str = "cpu",
                       **kwargs: Any) -> dict[str, Any]:
    """Perplexity of model A (e.g. the jointly trained Michi backbone) and model B (the text-only
    baseline trained with the same budget) on the same texts, and the ratio A / B.

    `ratio` is the token-perplexity ratio when both share a tokenizer, else the byte-perplexity
    ratio (`ratio_basis` says which); `within_target` is ratio <= target. `max_bytes` caps the
    text (not tokens) so that both models read exactly the same bytes."""
    a, b = load_text_lm(model_a, device=device), load_text_lm(model_b, device=device)
    texts = limit_bytes(texts, max_bytes)
    ra = perplexity(a, texts, **kwargs)
    rb = perplexity(b, texts, **kwargs)
    same = a.tokenizer_id() == b.tokenizer_id() and ra["tokens"] == rb["tokens"]
    ratio_token = ra["token_perplexity"] / rb["token_perplexity"]
    ratio_byte = ra["byte_perplexity"] / rb["byte_perplexity"]
    ratio = ratio_token if same else ratio_byte
    return {
        "a": {**ra, "identity": a.identity()}, "b": {**rb, "identity": b.identity()},
        "same_tokenizer": same, "ratio": ratio,
        "ratio_basis": "token_perplexity" if same else "byte_perplexity",
        "ratio_token_perplexity": ratio_token if same else None,
        "ratio_byte_perplexity": ratio_byte, "ratio_bits_per_byte": ra["bits_per_byte"] / rb["bits_per_byte"],
        "target": target, "within_target": ratio <= target,
    }
