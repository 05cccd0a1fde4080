"""The `michi` command line, run as a user would."""
import json
import subprocess
import sys

import numpy as np
import soundfile as sf

from michi.cli import main


def test_info_full_counts_parameters_per_part(capsys):
    assert main(["info", "--model", "full"]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out
    for part in ("backbone", "speak_head", "listen", "listen_text", "vocoder", "total"):
        assert f"  {part} " in out
    total = int(out.split("  total")[1].split()[0].replace(",", ""))
    assert abs(total - 530e6) / 530e6 < 0.05


def _synth(out, *extra):
    return subprocess.run([sys.executable, "-m", "michi.cli", "--threads", "2", "synth", "hi", "--out", str(out),
                           "--continue-ticks", "3", *extra], capture_output=True, text=True, timeout=300)


def test_synth_writes_24khz_wav_with_the_default_model(tmp_path):
    out = tmp_path / "hi.wav"
    proc = _synth(out)
    assert proc.returncode == 0, proc.stderr
    assert "UNTRAINED" not in proc.stderr  # the shipped model is trained
    audio, rate = sf.read(out)
    assert rate == 24_000 and len(audio) % 1920 == 0 and len(audio) >= 5 * 1920


def test_synth_with_random_weights_says_it_is_noise(tmp_path):
    proc = _synth(tmp_path / "hi.wav", "--model", "tiny")
    assert proc.returncode == 0, proc.stderr
    assert "UNTRAINED" in proc.stderr and "noise" in proc.stderr


def test_continue_and_bad_prompt(tmp_path, capsys):
    prompt = tmp_path / "prompt.wav"
    sf.write(prompt, (0.2 * np.sin(np.arange(16_000) / 10)).astype(np.float32), 16_000)
    out = tmp_path / "cont.wav"
    assert main(["continue", str(prompt), "--out", str(out), "--ticks", "4"]) == 0
    audio, rate = sf.read(out)
    assert rate == 24_000 and len(audio) == 4 * 1920
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF....not audio")
    assert main(["continue", str(garbage), "--out", str(out)]) == 2
    assert "cannot read audio" in capsys.readouterr().err


def test_bench_writes_json_report(tmp_path):
    report_path = tmp_path / "bench.json"
    assert main(["--threads", "2", "bench", "--presets", "tiny", "--ticks", "6", "--warmup", "1",
                 "--device", "cpu", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    tiny = report["presets"]["tiny"]
    parts = tiny["parts"]
    for part in ("listen_encoder", "listen_text_head", "backbone", "text_head", "speak_head", "vocoder", "tick"):
        assert parts[part]["median_ms"] > 0 and parts[part]["p95_ms"] >= parts[part]["median_ms"]
    assert parts["tick"]["median_ms"] >= parts["backbone"]["median_ms"]
    assert report["machine"]["device"] == "cpu" and tiny["trained_weights"] is False


def test_up_passes_auth_tls_host_and_admission_to_the_gateway_only(tmp_path, monkeypatch):
    from michi.cli import build_parser, up_mesh

    for key in ("MICHI_AUTH_TOKEN", "MICHI_TLS_CERT", "MICHI_TLS_KEY", "MICHI_HOST"):
        monkeypatch.delenv(key, raising=False)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    args = build_parser().parse_args(["up", "--model", "tiny", "--port", "6000", "--stage-ports", "6001,6002,6003",
                                      "--auth-token", "s3cret", "--tls-cert", str(cert), "--tls-key", str(key),
                                      "--max-calls", "7", "--host", "0.0.0.0"])
    mesh = up_mesh(args)
    assert mesh.ports == {"gateway": 6000, "listen": 6001, "backbone": 6002, "vocoder": 6003}
    assert mesh.gateway_args == ["--tls-cert", str(cert), "--tls-key", str(key), "--max-calls", "7"]
    assert mesh.gateway_env == {"MICHI_AUTH_TOKEN": "s3cret"}  # not on a command line `ps` shows
    assert "s3cret" not in mesh.gateway_args and not mesh.stage_args and "MICHI_AUTH_TOKEN" not in mesh.env
    assert mesh.gateway_root_certs == cert.read_bytes()  # the start-up health check goes over TLS
    assert mesh.gateway_host == "0.0.0.0" and mesh.gateway == "127.0.0.1:6000"
    # the environment gives the same defaults
    monkeypatch.setenv("MICHI_AUTH_TOKEN", "from-env")
    monkeypatch.setenv("MICHI_TLS_CERT", str(cert))
    monkeypatch.setenv("MICHI_TLS_KEY", str(key))
    mesh = up_mesh(build_parser().parse_args(["up", "--stage-ports", "auto"]))
    assert mesh.gateway_env == {"MICHI_AUTH_TOKEN": "from-env"} and "--tls-cert" in mesh.gateway_args
    assert "--max-calls" not in mesh.gateway_args and mesh.gateway == "127.0.0.1:50060"
    assert len(set(mesh.ports.values())) == 4


def test_up_and_say_refuse_missing_tls_files(tmp_path, monkeypatch, capsys):
    for key in ("MICHI_TLS_CERT", "MICHI_TLS_KEY", "MICHI_TLS_CA"):
        monkeypatch.delenv(key, raising=False)
    cert = tmp_path / "cert.pem"
    cert.write_bytes(b"x")
    assert main(["up", "--tls-cert", str(cert)]) == 2  # a certificate without its key
    assert "--tls-key" in capsys.readouterr().err
    assert main(["up", "--tls-cert", str(cert), "--tls-key", str(tmp_path / "nope.pem")]) == 2
    assert "nope.pem" in capsys.readouterr().err
    assert main(["say", "hi", "--tls-ca", str(tmp_path / "ca.pem")]) == 2
    assert "ca.pem" in capsys.readouterr().err
