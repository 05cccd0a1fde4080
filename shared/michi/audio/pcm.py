"""Wire encodings for raw audio (telephony, game and browser backends), as in Google Cloud Speech / Riva.

A call's config names an `Encoding` and a sample rate once; every chunk after that is raw bytes in
that encoding. `decode` turns bytes into float32 PCM in [-1, 1], `encode` does the reverse. G.711
(mu-law, A-law) follows the ITU reference (the Sun `g711.c` tables that every telephony stack and
Python's old `audioop` use), so bytes from a PSTN trunk decode to the exact same values here.

Chunks must hold whole samples: a LINEAR16 chunk with an odd byte count is an `AudioError`, never a
silently dropped byte (a lost byte would shift every later sample into noise).
"""
from __future__ import annotations

import enum

import numpy as np

from michi.audio.io import SUPPORTED_RATES_HZ, AudioError, as_mono_float32


class Encoding(str, enum.Enum):
    """Sample encodings on the wire. Values equal names, so a proto enum maps by `Encoding[name]`."""

    LINEAR16 = "LINEAR16"  # signed 16-bit little-endian
    MULAW = "MULAW"  # G.711 mu-law, 8 bits a sample, 8 kHz only
    ALAW = "ALAW"  # G.711 A-law, 8 bits a sample, 8 kHz only
    FLOAT32LE = "FLOAT32LE"  # IEEE float32 little-endian in [-1, 1] (Web Audio, game engines)

    @property
    def bytes_per_sample(self) -> int:
        return _BYTES_PER_SAMPLE[self]


_BYTES_PER_SAMPLE = {Encoding.LINEAR16: 2, Encoding.MULAW: 1, Encoding.ALAW: 1, Encoding.FLOAT32LE: 4}
_G711 = (Encoding.MULAW, Encoding.ALAW)
_G711_RATES_HZ = (8_000,)
_RATES_HZ = {
    Encoding.LINEAR16: SUPPORTED_RATES_HZ,
    Encoding.FLOAT32LE: SUPPORTED_RATES_HZ,
    Encoding.MULAW: _G711_RATES_HZ,
    Encoding.ALAW: _G711_RATES_HZ,
}


def as_encoding(encoding: Encoding | str) -> Encoding:
    """`Encoding` from itself or its name ("LINEAR16", "mulaw"); anything else is an AudioError."""
    if isinstance(encoding, Encoding):
        return encoding
    if isinstance(encoding, str) and encoding.upper() in Encoding.__members__:
        return Encoding[encoding.upper()]
    raise AudioError(f"unknown audio encoding {encoding!r}; supported: {', '.join(e.value for e in Encoding)}")


def supported_formats() -> dict[Encoding, tuple[int, ...]]:
    """Every encoding with the sample rates (Hz) it is accepted at."""
    return dict(_RATES_HZ)


def check_format(encoding: Encoding | str, rate_hz: int) -> Encoding:
    """Raise AudioError unless `encoding` at `rate_hz` is accepted; returns the parsed Encoding."""
    enc = as_encoding(encoding)
    if rate_hz not in _RATES_HZ[enc]:
        others = "; ".join(f"{e.value} at {', '.join(map(str, r))} Hz" for e, r in _RATES_HZ.items())
        why = " (G.711 is 8000 Hz only)" if enc in _G711 else ""
        raise AudioError(f"{enc.value} audio at {rate_hz} Hz is not supported{why}; supported: {others}")
    return enc


def num_samples(num_bytes: int, encoding: Encoding | str) -> int:
    """Samples in `num_bytes` of audio; AudioError when it is not a whole number of samples."""
    enc = as_encoding(encoding)
    width = enc.bytes_per_sample
    if num_bytes % width:
        bits = f"{8 * width}-bit"
        raise AudioError(f"truncated: {num_bytes} bytes is not a whole number of {bits} samples ({enc.value})")
    return num_bytes // width


def decode(data: bytes | bytearray | memoryview, encoding: Encoding | str) -> np.ndarray:
    """Raw bytes in `encoding` -> 1-D float32 PCM in [-1, 1] (FLOAT32LE is passed through unclipped)."""
    enc = as_encoding(encoding)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AudioError(f"audio data must be bytes, got {type(data).__name__}")
    num_samples(len(data), enc)
    if enc is Encoding.LINEAR16:
        return np.frombuffer(data, dtype="<i2").astype(np.float32) * np.float32(1.0 / 32768.0)
    if enc is Encoding.MULAW:
        return _ULAW_TO_FLOAT[np.frombuffer(data, dtype=np.uint8)]
    if enc is Encoding.ALAW:
        return _ALAW_TO_FLOAT[np.frombuffer(data, dtype=np.uint8)]
    pcm = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(pcm)):
        raise AudioError("FLOAT32LE audio contains NaN or infinite samples (not float PCM?)")
    return pcm


def encode(pcm: np.ndarray, encoding: Encoding | str) -> bytes:
    """PCM (float in [-1, 1] or int16; louder float is clipped) -> raw bytes in `encoding`."""
    enc = as_encoding(encoding)
    pcm = as_mono_float32(pcm)
    if enc is Encoding.FLOAT32LE:
        return pcm.astype("<f4").tobytes()
    # Float -> int16 as the usual 32768 scale, rounded to nearest; +1.0 saturates at 32767.
    ints = np.clip(np.rint(pcm * 32768.0), -32768, 32767).astype(np.int16)
    if enc is Encoding.LINEAR16:
        return ints.astype("<i2").tobytes()
    table = _INT16_TO_ULAW if enc is Encoding.MULAW else _INT16_TO_ALAW
    return table[ints.astype(np.int32) + 32768].tobytes()


# --- G.711 reference tables (CCITT / Sun Microsystems g711.c, public domain) -----------------------
# Built once at import by the reference algorithms, vectorised; encoding is then one table lookup
# per sample over all 65536 int16 values, decoding one lookup over the 256 codes.

def _segment(mag: np.ndarray, seg_ends: tuple[int, ...]) -> np.ndarray:
    """Index of the first segment end >= mag (8 when mag exceeds all of them)."""
    return np.searchsorted(np.asarray(seg_ends), mag, side="left")


def _ulaw_encode_int16(x: np.ndarray) -> np.ndarray:
    """Reference linear2ulaw on int16 values."""
    v = x.astype(np.int32) >> 2  # 14-bit
    mask = np.where(v < 0, 0x7F, 0xFF)
    v = np.minimum(np.abs(v), 8159) + 0x21  # clip, then add the bias (0x84 >> 2)
    seg = _segment(v, (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF))
    code = (np.minimum(seg, 7) << 4) | ((v >> (seg + 1)) & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _ulaw_decode_code(u: np.ndarray) -> np.ndarray:
    """Reference ulaw2linear: code -> int16 value."""
    u = ~u.astype(np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _alaw_encode_int16(x: np.ndarray) -> np.ndarray:
    """Reference linear2alaw on int16 values."""
    v = x.astype(np.int32) >> 3  # 13-bit
    mask = np.where(v >= 0, 0xD5, 0x55)
    v = np.where(v >= 0, v, -v - 1)
    seg = _segment(v, (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF))
    segc = np.minimum(seg, 7)
    quant = np.where(segc < 2, (v >> 1) & 0xF, (v >> np.maximum(segc, 1)) & 0xF)
    code = np.where(seg >= 8, 0x7F, (segc << 4) | quant)
    return (code ^ mask).astype(np.uint8)


def _alaw_decode_code(a: np.ndarray) -> np.ndarray:
    """Reference alaw2linear: code -> int16 value."""
    a = a.astype(np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, t + 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


_ALL_INT16 = np.arange(-32768, 32768, dtype=np.int32)
_ALL_CODES = np.arange(256, dtype=np.int32)
_INT16_TO_ULAW = _ulaw_encode_int16(_ALL_INT16)
_INT16_TO_ALAW = _alaw_encode_int16(_ALL_INT16)
_ULAW_TO_FLOAT = _ulaw_decode_code(_ALL_CODES).astype(np.float32) / np.float32(32768.0)
_ALAW_TO_FLOAT = _alaw_decode_code(_ALL_CODES).astype(np.float32) / np.float32(32768.0)
del _ALL_INT16, _ALL_CODES
