"""Deterministic offline English text, from Debian packages (nothing is downloaded).

- `sentences(split)`: short clean sentences (4 to 16 words) for the synthetic speech corpus: the
  example sentences of WordNet (`wordnet-base`, about 30k after cleaning). Only letters, spaces,
  commas, apostrophes and inner hyphens, no digits, no abbreviations or acronyms, so what a TTS
  voice says and what Whisper writes down are the same words. Capitalised, ending in a full stop.
- `text_corpus(split)`: longer passages for pure-text LM training and perplexity: fortunes
  (`fortunes`, `fortunes-min`), WordNet glosses and the prose of the Python documentation
  (`python3.11-doc`), a few MB in all.

Splits are stable: a text is held out when the SHA-1 of its lower-cased form falls in the
first `HELDOUT_PERCENT` of 100 buckets, so adding or removing a source never moves a sentence
from one split to the other. Every list is sorted (byte order), hence the same on every machine
with the same Debian packages.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
from functools import lru_cache
from pathlib import Path

HELDOUT_PERCENT = 5
SPLITS = ("train", "heldout", "all")

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
PYDOC_DIR = Path("/usr/share/doc/python3.11/html")

MIN_WORDS, MAX_WORDS = 4, 16
# Words a TTS voice and Whisper may read differently (abbreviations, spelled-out forms).
_BANNED_WORDS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "etc", "vs", "ok", "okay", "co", "inc",
                 "ltd", "mt", "ft", "lb", "oz", "no", "vol", "pp", "ie", "eg", "am", "pm"}
_SENTENCE_CHARS = re.compile(r"[A-Za-z][A-Za-z ,']*[A-Za-z]")
_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")


class TextSourceMissing(FileNotFoundError):
    """A Debian text package is not installed; the message names it."""


def _need(path: Path, package: str) -> Path:
    if not path.exists():
        raise TextSourceMissing(f"{path} not found: install the Debian package `{package}` "
                                f"(apt-get install {package})")
    return path


def is_heldout(text: str) -> bool:
    """The stable split: True for about HELDOUT_PERCENT % of texts."""
    digest = hashlib.sha1(text.strip().lower().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def _select(items: list[str], split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if split == "all":
        return list(items)
    want = split == "heldout"
    return [t for t in items if is_heldout(t) == want]


# ---- sentences for TTS ------------------------------------------------------------------------
def clean_sentence(raw: str) -> str | None:
    """A WordNet example -> a TTS-ready sentence, or None when it does not qualify."""
    s = " ".join(raw.replace("\u2019", "'").split())
    end = "."
    if s and s[-1] in ".?!":
        end = "?" if s[-1] == "?" else "."
        s = s[:-1].rstrip()
    if "--" in s or "''" in s or ", ," in s:
        return None
    if not _SENTENCE_CHARS.fullmatch(s):
        return None
    tokens = s.replace(",", " ").split()
    if not MIN_WORDS <= len(tokens) <= MAX_WORDS:
        return None
    for tok in tokens:
        if not _WORD.fullmatch(tok):  # stray hyphen or apostrophe
            return None
        bare = tok.lower().strip("'")
        if bare in _BANNED_WORDS:
            return None
        letters = [c for c in tok if c.isalpha()]
        if sum(c.isupper() for c in letters) > 1:  # acronyms, McDonald, NASA
            return None
        if len(letters) == 1 and tok not in ("a", "A", "I"):  # initials
            return None
    if re.search(r"\b[a-z]+'(?!s\b|t\b|re\b|ve\b|ll\b|d\b|m\b)", s):  # quotes, not contractions
        return None
    return s[0].upper() + s[1:] + end


def _wordnet_examples() -> list[str]:
    d = _need(WORDNET_DIR, "wordnet-base")
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = _need(d / f"data.{pos}", "wordnet-base")
        with path.open(encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):  # licence header
                    continue
                _, _, gloss = line.partition("|")
                out += re.findall(r'"([^"]+)"', gloss)
    return out


@lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for raw in _wordnet_examples():
        s = clean_sentence(raw)
        if s is not None:
            seen.setdefault(s.lower(), s)
    return tuple(sorted(seen.values()))


def sentences(split: str = "train") -> list[str]:
    """Clean English sentences for TTS; split "train", "heldout" (stable ~5 %) or "all"."""
    return _select(list(_all_sentences()), split)


def bytes_of(text: str) -> int:
    """UTF-8 bytes: what the byte-level model reads, one per 80 ms tick at most."""
    return len(text.encode("utf-8"))


# ---- longer passages for text-only LM training -------------------------------------------------
def _fortunes() -> list[str]:
    d = _need(FORTUNES_DIR, "fortunes")
    out = []
    for path in sorted(d.iterdir()):
        if path.suffix or not path.is_file():  # skip .dat index files and .u8 links
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        for entry in re.split(r"^%\s*$", text, flags=re.M):
            entry = entry.strip("\n")
            if len(entry.strip()) >= 20:
                out.append(entry.strip())
    return out


def _wordnet_synsets() -> list[tuple[list[str], str]]:
    """Each WordNet synset's words and its gloss (the definition, then its quoted examples)."""
    d = _need(WORDNET_DIR, "wordnet-base")
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        with (d / f"data.{pos}").open(encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                head, _, gloss = line.partition("|")
                fields = head.split()
                if len(fields) < 5:
                    continue
                words = [w.replace("_", " ") for w in fields[4:4 + 2 * int(fields[3], 16):2]]
                out.append(([re.sub(r"\(\w+\)$", "", w) for w in words], gloss.strip()))
    return out


def _wordnet_glosses() -> list[str]:
    out = [f"{', '.join(words)}: {gloss}" for words, gloss in _wordnet_synsets()]
    # Group glosses into passages of ~1000 characters, so the LM sees document-like text.
    return _group(out, 1000, "\n")


def wordnet_definitions() -> list[str]:
    """WordNet's definitions without their quoted examples (the examples are `sentences`, held-out
    ones among them), each clause of three words or more on its own, bracketed asides dropped:
    128k pieces of plain English for the hearing decoder's word LM."""
    out = []
    for _words, gloss in _wordnet_synsets():
        for part in re.sub(r'"[^"]*"', "", gloss).split(";"):
            part = re.sub(r"\([^)]*\)", "", part).strip()
            if len(part.split()) >= 3:
                out.append(part)
    return out


_TAG = re.compile(r"<[^>]+>")


def _pydoc() -> list[str]:
    d = _need(PYDOC_DIR, "python3.11-doc")
    out = []
    for sub in ("tutorial", "howto", "faq", "reference", "library", "whatsnew"):
        for path in sorted((d / sub).glob("*.html")):
            page = path.read_text(encoding="utf-8", errors="replace")
            paras = []
            for m in re.finditer(r"<p>(.*?)</p>", page, flags=re.S):
                p = " ".join(html.unescape(_TAG.sub("", m.group(1))).split())
                if len(p) >= 40:
                    paras.append(p)
            out += _group(paras, 2000, "\n\n")
    return out


def _group(items: list[str], size: int, sep: str) -> list[str]:
    out, cur, n = [], [], 0
    for item in items:
        cur.append(item)
        n += len(item)
        if n >= size:
            out.append(sep.join(cur))
            cur, n = [], 0
    if cur:
        out.append(sep.join(cur))
    return out


TEXT_SOURCES = {"fortunes": _fortunes, "wordnet": _wordnet_glosses, "pydoc": _pydoc}


@lru_cache(maxsize=1)
def _all_passages() -> tuple[str, ...]:
    seen: set[str] = set()
    out = []
    for name in sorted(TEXT_SOURCES):
        for p in TEXT_SOURCES[name]():
            if p not in seen:
                seen.add(p)
                out.append(p)
    return tuple(out)


def text_corpus(split: str = "train") -> list[str]:
    """Passages (fortunes, WordNet glosses, Python docs prose) for text-only LM training;
    split "train", "heldout" (stable ~5 %) or "all". Order: by source, then file order."""
    return _select(list(_all_passages()), split)


def read_texts(path: str | Path) -> list[str]:
    """Documents from a file: JSONL (one {"text": ...} per line), a directory (every *.txt file is one
    document, in name order), or plain text (documents separated by blank lines)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.txt files")
        return [f.read_text(encoding="utf-8") for f in files]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_text(encoding="utf-8")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from None
            texts.append(doc["text"] if isinstance(doc, dict) else str(doc))
        return texts
    return [t.strip("\n") for t in raw.split("\n\n") if t.strip()]


def _inflections(lemma: str, pos: str) -> list[str]:
    """Regular English inflections of a WordNet lemma: plurals of nouns; -s, -ed, -ing of verbs;
    -er, -est of short adjectives. Rules only (irregular forms come from WordNet's .exc lists)."""
    consonant_y = len(lemma) > 1 and lemma.endswith("y") and lemma[-2] not in "aeiou"
    s = (lemma[:-1] + "ies" if consonant_y else lemma + "es" if lemma.endswith(("s", "x", "z", "ch", "sh"))
         else lemma + "s")
    if pos == "noun":
        return [s]
    stem = lemma[:-1] if lemma.endswith("e") else lemma[:-1] + "i" if consonant_y else lemma
    if pos == "verb":
        ing = lemma[:-1] + "ying" if lemma.endswith("ie") else (
            lemma[:-1] if lemma.endswith("e") and not lemma.endswith(("ee", "ye", "oe")) else lemma) + "ing"
        return [s, stem + "ed", ing]
    if pos == "adj" and len(lemma) <= 6:
        return [stem + "er", stem + "est"]
    return []


@lru_cache(maxsize=1)
def dictionary_words() -> frozenset[str]:
    """English words from a dictionary rather than from the corpus's texts (so they include words
    of no held-out sentence by construction): WordNet's one-word lemmas (`wordnet-base`), their
    regular inflections and its irregular forms, and the words of numbers and ordinals as
    `michi.eval.wer.normalize_text` spells digits. Lower case, letters and apostrophes."""
    from ..eval.wer import number_to_words, ordinal_words

    d = _need(WORDNET_DIR, "wordnet-base")
    word = re.compile(r"[a-z]+(?:'[a-z]+)?")
    out: set[str] = set()
    for pos in ("noun", "verb", "adj", "adv"):
        with (d / f"index.{pos}").open(encoding="latin-1") as f:
            for line in f:
                lemma = line.split(" ", 1)[0]
                if not line.startswith(" ") and word.fullmatch(lemma):
                    out.add(lemma)
                    out.update(_inflections(lemma, pos))
        exceptions = d / f"{pos[:3]}.exc"
        if exceptions.is_file():
            with exceptions.open(encoding="latin-1") as f:
                out.update(w for line in f for w in line.split()[:1] if word.fullmatch(w))
    numbers = [number_to_words(n) for n in (*range(101), 1000, 10 ** 6, 10 ** 9)]
    out.update(w for n in numbers + [ordinal_words(n) for n in range(1, 101)] + ["one hundredth", "one thousandth"]
               for w in n.split())
    return frozenset(out)
