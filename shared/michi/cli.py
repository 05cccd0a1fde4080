"""`michi` command line: info, synth, continue, bench."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .api import UNTRAINED_WARNING, Michi, load
from .config import MichiConfig
from .generate import TTS_TAIL_TICKS
from .model.backbone import backbone_config_from_hf
from .model.michi import MichiModel

MODEL_HELP = "default (the shipped trained model), a preset (tiny, full: random weights) or a checkpoint directory"


def _warn_untrained(michi: Michi) -> None:
    for warning in michi.warnings:  # untrained weights, an unfitted mel-PCA basis
        print(f"WARNING: {warning}", file=sys.stderr)


def _config_for(source: str, backbone: str | None) -> tuple[MichiConfig, dict]:
    from .api import config_of

    cfg, info = config_of(source)
    if backbone:  # size the model with this Hugging Face backbone
        cfg.backbone = backbone_config_from_hf(backbone)
    return cfg, info


def cmd_info(args: argparse.Namespace) -> int:
    cfg, info = _config_for(args.model, args.backbone)
    with torch.device("meta"):  # count parameters without allocating them
        counts = MichiModel(cfg, load_pretrained=False).parameter_counts()
    b = cfg.backbone
    from .api import resolve_source

    about = info.get("weights") or info.get("what") or info.get("note", "")
    print(f"model: {resolve_source(args.model)} (preset {cfg.preset}); weights: "
          f"{'trained' if info.get('trained') else 'UNTRAINED'} ({about})")
    print(f"backbone: hidden {b.hidden_size}, {b.num_layers} layers, {b.num_heads}/{b.num_kv_heads} heads, "
          f"FFN {b.ffn_size}, vocab {b.vocab_size} (+stream tokens), tokenizer {b.tokenizer}")
    codec = cfg.codec + (f" (mel-PCA: fixed log-mel projection, {cfg.decoder} decoder)" if cfg.codec == "melpca" else "")
    print(f"audio: {cfg.sample_rate_hz} Hz, {cfg.frame_samples} samples per 80 ms tick, latent dim {cfg.latent_dim}, "
          f"codec {codec}")
    print("parameters:")
    for part, n in counts.items():
        print(f"  {part:<14}{n:>14,}  ({n / 1e6:.1f}M)")
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "parameters": counts, "info": info}, indent=2))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .audio.io import write_wav
    from .generate import tts

    michi = load(args.model, seed=args.seed)
    _warn_untrained(michi)
    t0 = time.perf_counter()
    gen = tts(michi, args.text, continue_ticks=args.continue_ticks, seed=args.seed)
    elapsed = time.perf_counter() - t0
    write_wav(args.out, gen.audio, michi.cfg.sample_rate_hz)
    seconds = len(gen.audio) / michi.cfg.sample_rate_hz
    print(f"wrote {args.out}: {seconds:.2f} s of 24 kHz audio in {len(gen.ticks)} ticks "
          f"({elapsed:.2f} s, {elapsed / seconds:.2f} x real time)")
    print(f"agent text: {gen.text!r}")
    return 0


def cmd_continue(args: argparse.Namespace) -> int:
    from .audio.io import read_wav, write_wav
    from .generate import continue_audio

    michi = load(args.model, seed=args.seed)
    _warn_untrained(michi)
    pcm, rate = read_wav(args.prompt)
    gen = continue_audio(michi, pcm, rate, ticks=args.ticks, seed=args.seed)
    write_wav(args.out, gen.audio, michi.cfg.sample_rate_hz)
    print(f"wrote {args.out}: {len(gen.audio) / michi.cfg.sample_rate_hz:.2f} s continuing "
          f"{len(pcm) / rate:.2f} s of prompt")
    print(f"agent text: {gen.text!r}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_report, run_bench

    presets = args.presets.split(",")
    if args.floor:  # computed, not timed: no model runs
        from .config import preset
        from .floor import floor_report, format_floor

        reports = {name: floor_report(preset(name)) for name in presets}
        print("\n\n".join(format_floor(r) for r in reports.values()))
        Path(args.json).write_text(json.dumps(reports, indent=2))
        print(f"report: {args.json}")
        return 0
    ticks = {name: args.ticks if args.ticks else (100 if name == "tiny" else 30) for name in presets}
    if args.batch:  # batched engine ticks, as the backbone stage runs them
        from .bench import bench_batch, machine_info

        batches = [int(b) for b in args.batch.split(",")]
        report = {"machine": machine_info(args.device), "what": "one batched engine tick (backbone, text head, "
                  "speak head with all Euler steps) for B live calls", "presets": {
                      name: bench_batch(name, batches, ticks[name], args.warmup, args.device, args.context)
                      for name in presets}}
        Path(args.json).write_text(json.dumps(report, indent=2))
        for name, r in report["presets"].items():
            for b in r["batches"].values():
                print(f"{name}: {b['calls']:>4} calls  median {b['median_ms']:8.2f} ms  p95 {b['p95_ms']:8.2f} ms")
        print(f"report: {args.json}")
        return 0
    report = run_bench(presets, ticks, args.warmup, args.device, Path(args.json))
    print(format_report(report))
    print(f"report: {args.json}")
    if any(not r["trained_weights"] for r in report["presets"].values()):
        print("(random weights: timing only)")
    return 0


def _stage_ports(value: str) -> dict[str, int]:
    """--stage-ports: "auto" (free ports) or the listen,backbone,vocoder ports."""
    from .serving.launcher import free_port

    names = ("listen", "backbone", "vocoder")
    if value == "auto":
        return {name: free_port() for name in names}
    try:
        ports = [int(p) for p in value.split(",")]
    except ValueError:
        ports = []
    if len(ports) != 3:
        raise ValueError(f"--stage-ports wants three ports (listen,backbone,vocoder) or auto, not {value!r}")
    return dict(zip(names, ports))


def up_mesh(args: argparse.Namespace):
    """The Mesh `michi up` starts (not started yet). The gateway's own flags (auth, TLS, host,
    admission) go to the gateway process only: the other stages are internal."""
    from .serving.launcher import Mesh

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together (or MICHI_TLS_CERT and MICHI_TLS_KEY)")
    gateway_args = []
    # the token goes in the gateway's environment, not on its command line (which `ps` shows anyone)
    gateway_env = {"MICHI_AUTH_TOKEN": args.auth_token} if args.auth_token else {}
    root_certs = None
    if args.tls_cert:
        for path in (args.tls_cert, args.tls_key):
            if not Path(path).is_file():
                raise FileNotFoundError(f"TLS file not found: {path}")
        gateway_args += ["--tls-cert", str(Path(args.tls_cert).resolve()), "--tls-key", str(Path(args.tls_key).resolve())]
        root_certs = Path(args.tls_cert).read_bytes()  # the start-up health check trusts the gateway's own certificate
    if args.max_calls:
        gateway_args += ["--max-calls", str(args.max_calls)]
    ports = dict(_stage_ports(args.stage_ports), gateway=args.port)
    execution = {"MICHI_EXECUTION": args.execution, **({"MICHI_TRITON_URL": args.triton_url} if args.triton_url else {})}
    return Mesh(model=args.model, ports=ports, threads=args.stage_threads, log_dir=args.log_dir, env=execution,
                replicas={"backbone": args.backbone_replicas, "vocoder": args.vocoder_replicas},
                gateway_args=gateway_args, gateway_env=gateway_env, gateway_host=args.host, gateway_root_certs=root_certs,
                gateway_server_name=args.tls_server_name)


def cmd_up(args: argparse.Namespace) -> int:
    """Every stage on this machine, each its own process, until Ctrl-C / SIGTERM."""
    import signal

    mesh = up_mesh(args)
    print(f"starting listen, backbone, vocoder, gateway (model {args.model}) ...", flush=True)
    mesh.start()
    print(f"michi is up: gateway {mesh.gateway}; stages {mesh.addresses}; "
          f"store {'redis ' + os.environ['REDIS_URL'] if os.environ.get('REDIS_URL') else 'in-process'}", flush=True)
    hint = (" --gateway " + mesh.gateway if args.port != 50060 or args.host != "127.0.0.1" else "") + \
        (" --token ..." if args.auth_token else "") + (f" --tls-ca {args.tls_cert}" if args.tls_cert else "")
    print(f"try: michi say 'Hello there.'{hint} --out hello.wav    (Ctrl-C stops every stage)", flush=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"] and all(p.poll() is None for p in mesh.processes.values()):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    dead = {n: p.returncode for n, p in mesh.processes.items() if p.poll() is not None}
    codes = mesh.stop()
    print(f"stopped: {codes}" + (f" (exited early: {dead})" if dead else ""))
    return 1 if dead else 0


def _print_call(result, out: str | None, rate: int) -> None:
    from .audio.io import write_wav

    if not result.trained_weights:
        print(f"WARNING: {UNTRAINED_WARNING}", file=sys.stderr)
    if out:
        write_wav(out, result.pcm, rate)
        print(f"wrote {out}: {len(result.pcm) / rate:.2f} s")
    print(f"session: {result.session_id}")
    print(f"time to first audio: {result.first_audio_ms:.1f} ms" if result.first_audio_ms is not None
          else "no agent audio")
    print(f"user transcript: {result.user_text!r}")
    print(f"agent text: {result.agent_text!r}")
    events = [e.WhichOneof("event") for e in result.events]
    print(f"events: {events}")


def _root_certs(args: argparse.Namespace) -> bytes | None:
    """--tls-ca: the PEM file a TLS gateway's certificate is checked against (None: plaintext)."""
    if not args.tls_ca:
        return None
    path = Path(args.tls_ca)
    if not path.is_file():
        raise FileNotFoundError(f"--tls-ca file not found: {path}")
    return path.read_bytes()


def cmd_talk(args: argparse.Namespace) -> int:
    """Stream a file in real time through the gateway, like a caller."""
    import asyncio

    from .audio.io import read_wav
    from .serving import client

    pcm, rate = read_wav(args.audio)
    if rate not in (8000, 16000, 24000, 48000):
        pcm, rate = read_wav(args.audio, rate_out_hz=16000)
    result = asyncio.run(client.converse(
        args.gateway, client.config(rate_in=rate, rate_out=24000, system_text=args.system or ""),
        client.audio_requests(pcm, rate, realtime=not args.fast), token=args.token, tail_s=args.tail_s,
        root_certs=_root_certs(args)))
    _print_call(result, args.out, 24000)
    return 0


def cmd_say(args: argparse.Namespace) -> int:
    """Speak a text through the mesh (TTS mode)."""
    import asyncio

    from .proto.gateway.v1 import gateway_pb2 as pb
    from .serving import client

    result = asyncio.run(client.converse(args.gateway, client.config(mode=pb.TTS, text=args.text, rate_out=24000),
                                         token=args.token, root_certs=_root_certs(args)))
    _print_call(result, args.out, 24000)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="michi", description="Michi: a full-duplex speech language model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    sub = p.add_subparsers(dest="command", required=True)

    def model_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default="default", help=MODEL_HELP)
        sp.add_argument("--seed", type=int, default=0)

    sp = sub.add_parser("info", help="config and parameter count per part")
    sp.add_argument("--model", default="default", help=MODEL_HELP)
    sp.add_argument("--backbone", default=None, help="local Hugging Face Llama checkpoint directory")
    sp.add_argument("--json", action="store_true", help="also print the config as JSON")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("synth", help="text to a 24 kHz WAV (causal TTS)")
    sp.add_argument("text")
    sp.add_argument("--out", "-o", default="michi.wav")
    sp.add_argument("--continue-ticks", type=int, default=TTS_TAIL_TICKS, help="free ticks after the text")
    model_arg(sp)
    sp.set_defaults(func=cmd_synth)

    sp = sub.add_parser("continue", help="continue an audio prompt, to a 24 kHz WAV")
    sp.add_argument("prompt", help="audio file (WAV, FLAC, ...), any common rate")
    sp.add_argument("--out", "-o", default="michi-continued.wav")
    sp.add_argument("--ticks", type=int, default=25, help="ticks (80 ms each) to generate")
    model_arg(sp)
    sp.set_defaults(func=cmd_continue)

    sp = sub.add_parser("up", help="start every stage (listen, backbone, vocoder, gateway) on this machine")
    sp.add_argument("--model", default="default", help=MODEL_HELP)
    sp.add_argument("--port", type=int, default=50060, help="gateway port")
    sp.add_argument("--host", default=os.environ.get("MICHI_HOST", "127.0.0.1"),
                    help="the gateway's listening address (0.0.0.0: every interface; default MICHI_HOST, else "
                         "127.0.0.1); the other stages are reached over 127.0.0.1")
    sp.add_argument("--stage-ports", default="50061,50062,50063",
                    help="listen,backbone,vocoder ports, or auto (free ports)")
    sp.add_argument("--stage-threads", type=int, default=1, help="torch threads per stage process")
    sp.add_argument("--backbone-replicas", type=int, default=1)
    sp.add_argument("--vocoder-replicas", type=int, default=1)
    sp.add_argument("--log-dir", default=None, help="one JSON log file per stage (default: this terminal)")
    sp.add_argument("--execution", default=os.environ.get("MICHI_EXECUTION", "torch"), choices=["torch", "onnxruntime", "triton"],
                    help="where the listen encoder and vocoder steps run (onnxruntime: exported at start)")
    sp.add_argument("--triton-url", default=None, help="with --execution triton: the Triton gRPC address")
    sp.add_argument("--auth-token", default=os.environ.get("MICHI_AUTH_TOKEN"),
                    help="the gateway requires this bearer token (default MICHI_AUTH_TOKEN)")
    sp.add_argument("--tls-cert", default=os.environ.get("MICHI_TLS_CERT"),
                    help="the gateway serves TLS with this PEM certificate (default MICHI_TLS_CERT)")
    sp.add_argument("--tls-key", default=os.environ.get("MICHI_TLS_KEY"),
                    help="its PEM private key (default MICHI_TLS_KEY)")
    sp.add_argument("--tls-server-name", default=None,
                    help="the name in the certificate, when it names neither the --host address nor 127.0.0.1 "
                         "(for michi up's own health check of the gateway)")
    sp.add_argument("--max-calls", type=int, default=None,
                    help="gateway admission control: calls at once, beyond: RESOURCE_EXHAUSTED "
                         "(default: MICHI_MAX_CALLS, which every stage reads, else the gateway's default)")
    sp.set_defaults(func=cmd_up)

    def gateway_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--gateway", default=os.environ.get("MICHI_GATEWAY", "127.0.0.1:50060"))
        sp.add_argument("--token", default=os.environ.get("MICHI_AUTH_TOKEN"), help="bearer token")
        sp.add_argument("--tls-ca", default=os.environ.get("MICHI_TLS_CA"),
                        help="a TLS gateway: the PEM root certificate to trust (its self-signed certificate or "
                             "its CA; default MICHI_TLS_CA)")
        sp.add_argument("--out", "-o", default=None, help="write the agent audio to this WAV")

    sp = sub.add_parser("talk", help="stream an audio file through the gateway in real time")
    sp.add_argument("--audio", required=True, help="audio file (any common format and rate)")
    sp.add_argument("--system", default=None, help="system prompt")
    sp.add_argument("--fast", action="store_true", help="send the file at once (the gateway still paces)")
    sp.add_argument("--tail-s", type=float, default=1.0, help="keep listening this long after the file")
    gateway_args(sp)
    sp.set_defaults(func=cmd_talk)

    sp = sub.add_parser("say", help="speak a text through the mesh (TTS mode)")
    sp.add_argument("text")
    gateway_args(sp)
    sp.set_defaults(func=cmd_say)

    sp = sub.add_parser("bench", help="per-tick latency of each part; JSON report")
    sp.add_argument("--presets", default="tiny,full")
    sp.add_argument("--ticks", type=int, default=0, help="measured ticks (default 100 tiny, 30 full)")
    sp.add_argument("--warmup", type=int, default=5)
    sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sp.add_argument("--json", default="bench.json")
    sp.add_argument("--batch", default=None, help="e.g. 1,16,64: time one batched engine tick for that many calls")
    sp.add_argument("--context", type=int, default=0, help="with --batch: text positions prefilled per call first")
    sp.add_argument("--floor", action="store_true", help="the bandwidth and FLOP floor of a tick on common GPUs "
                    "(computed from the config, nothing timed)")
    sp.set_defaults(func=cmd_bench)

    # michi data ... / train ... / eval ... / triton ...: each package registers its own subcommands.
    from .data.cli import add_data_commands
    from .eval.cli import add_eval_commands
    from .serving.triton.cli import add_triton_commands
    from .train.cli import add_train_commands

    for add_commands in (add_data_commands, add_train_commands, add_eval_commands, add_triton_commands):
        add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a gRPC error from the mesh: its status says what to do
        import grpc

        if isinstance(e, grpc.RpcError):
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
