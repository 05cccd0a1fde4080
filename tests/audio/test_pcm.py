import numpy as np
import pytest

from michi.audio.io import SUPPORTED_RATES_HZ, AudioError
from michi.audio.pcm import Encoding, check_format, decode, encode, num_samples

FULL_SCALE_G711_ULAW = 32124 / 32768  # largest mu-law magnitude (ITU G.711)


def test_mulaw_known_code_points():
    assert encode(np.array([0.0, 1.0, -1.0], np.float32), Encoding.MULAW) == b"\xff\x80\x00"
    # 0xFF and 0x7F are +0 and -0; 0x80 / 0x00 are the full-scale codes.
    got = decode(b"\xff\x7f\x80\x00\xfe", Encoding.MULAW)
    np.testing.assert_array_equal(got, np.array([0, 0, 32124, -32124, 8], np.float32) / 32768)


def test_alaw_known_code_points():
    assert encode(np.array([0.0, 1.0, -1.0], np.float32), Encoding.ALAW) == b"\xd5\xaa\x2a"
    got = decode(b"\xd5\x55\xaa\x2a", Encoding.ALAW)
    np.testing.assert_array_equal(got, np.array([8, -8, 32256, -32256], np.float32) / 32768)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_g711_matches_reference_for_every_int16_value():
    audioop = pytest.importorskip("audioop", reason="stdlib audioop (the G.711 reference) left in Python 3.13")
    ints = np.arange(-32768, 32768, dtype=np.int16)
    for enc, lin2x, x2lin in ((Encoding.MULAW, audioop.lin2ulaw, audioop.ulaw2lin),
                              (Encoding.ALAW, audioop.lin2alaw, audioop.alaw2lin)):
        assert encode(ints, enc) == lin2x(ints.astype("<i2").tobytes(), 2)
        codes = bytes(range(256))
        ref = np.frombuffer(x2lin(codes, 2), "<i2").astype(np.float32) / 32768
        np.testing.assert_array_equal(decode(codes, enc), ref)


@pytest.mark.parametrize("enc", [Encoding.MULAW, Encoding.ALAW])
def test_g711_round_trip_within_quantisation_error(enc):
    x = np.linspace(-0.98, 0.98, 20_001, dtype=np.float32)
    err = np.abs(decode(encode(x, enc), enc) - x)
    # Logarithmic quantiser: half a step is about |x| / 32 (4 bits of mantissa), with a floor
    # at the smallest step near zero.
    assert np.all(err <= np.abs(x) / 32 + 16 / 32768)
    # And on a -6 dBFS tone, G.711's ~38 dB SNR.
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000).astype(np.float32)
    noise = decode(encode(tone, enc), enc) - tone
    assert 10 * np.log10(np.mean(tone**2) / np.mean(noise**2)) > 35


def test_linear16_is_signed_little_endian_and_lossless():
    assert encode(np.array([0.5, -1.0, 1.0, -0.5], np.float32), "LINEAR16") == b"\x00\x40\x00\x80\xff\x7f\x00\xc0"
    raw = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    assert encode(decode(raw, Encoding.LINEAR16), Encoding.LINEAR16) == raw
    np.testing.assert_array_equal(decode(b"\x01\x00\xff\xff", "linear16"), np.array([1, -1], np.float32) / 32768)


def test_float32le_round_trip_and_clipping_of_integer_encodings():
    x = np.random.default_rng(1).uniform(-1, 1, 1000).astype(np.float32)
    np.testing.assert_array_equal(decode(encode(x, Encoding.FLOAT32LE), Encoding.FLOAT32LE), x)
    loud = np.array([1.5, -3.0], np.float32)
    assert encode(loud, Encoding.LINEAR16) == b"\xff\x7f\x00\x80"
    assert encode(loud, Encoding.MULAW) == b"\x80\x00"


def test_empty_chunks_are_fine():
    for enc in Encoding:
        assert decode(b"", enc).shape == (0,)
        assert encode(np.zeros(0, np.float32), enc) == b""


def test_truncated_or_garbage_input_is_an_error_not_dropped_data():
    with pytest.raises(AudioError, match="truncated: 1001 bytes is not a whole number of 16-bit samples"):
        decode(b"\x00" * 1001, Encoding.LINEAR16)
    with pytest.raises(AudioError, match="truncated: 6 bytes is not a whole number of 32-bit samples"):
        decode(b"\x00" * 6, Encoding.FLOAT32LE)
    with pytest.raises(AudioError, match="NaN or infinite"):
        decode(np.array([0.0, np.nan], "<f4").tobytes(), Encoding.FLOAT32LE)
    with pytest.raises(AudioError, match="must be bytes"):
        decode("\x00\x00", Encoding.LINEAR16)
    with pytest.raises(AudioError, match="NaN"):
        encode(np.array([np.inf], np.float32), Encoding.MULAW)
    with pytest.raises(AudioError, match="unknown audio encoding 'OGG_OPUS'.*LINEAR16"):
        decode(b"", "OGG_OPUS")
    assert num_samples(1000, Encoding.LINEAR16) == 500
    with pytest.raises(AudioError, match="truncated"):
        num_samples(3, "LINEAR16")


def test_check_format():
    for rate in SUPPORTED_RATES_HZ:
        assert check_format(Encoding.LINEAR16, rate) is Encoding.LINEAR16
        assert check_format("FLOAT32LE", rate) is Encoding.FLOAT32LE
    assert check_format("MULAW", 8000) is Encoding.MULAW
    with pytest.raises(AudioError, match=r"MULAW audio at 16000 Hz is not supported \(G.711 is 8000 Hz only\)"):
        check_format(Encoding.MULAW, 16000)
    with pytest.raises(AudioError, match="LINEAR16 at 8000, 16000, 22050, 24000"):
        check_format(Encoding.LINEAR16, 11025)
    assert Encoding["MULAW"] is Encoding.MULAW and Encoding.MULAW.bytes_per_sample == 1
