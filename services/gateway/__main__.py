"""python -m services.gateway --port 50060 --listen 127.0.0.1:50061 --backbone ... --vocoder ..."""
import asyncio
import os
from pathlib import Path

from michi.api import config_of
from michi.model.tokenizer import StreamVocab, load_tokenizer
from michi.serving.server import Stage, configure_logging, start_metrics
from michi.serving.stage_cli import stage_parser
from michi.session.store import open_store

from .contract import Limits
from .server import GatewayServicer, GatewaySettings, add_to_server


def addresses(value: str) -> list[str]:
    return [a.strip() for a in value.split(",") if a.strip()]


async def main() -> None:
    parser = stage_parser("gateway", 50060)
    env = os.environ.get
    parser.add_argument("--listen", default=env("MICHI_LISTEN_ADDRS", "127.0.0.1:50061"), help="comma-separated replicas")
    parser.add_argument("--backbone", default=env("MICHI_BACKBONE_ADDRS", "127.0.0.1:50062"))
    parser.add_argument("--vocoder", default=env("MICHI_VOCODER_ADDRS", "127.0.0.1:50063"))
    parser.add_argument("--redis-url", default=env("REDIS_URL"), help="session store; none: in-process")
    parser.add_argument("--auth-token", default=env("MICHI_AUTH_TOKEN"), help="require this bearer token")
    parser.add_argument("--tls-cert", default=env("MICHI_TLS_CERT"))
    parser.add_argument("--tls-key", default=env("MICHI_TLS_KEY"))
    parser.add_argument("--stage-timeout-s", type=float, default=float(env("MICHI_STAGE_TIMEOUT_S", "5")),
                        help="a stage that does not answer a tick within this is failed over (MICHI_STAGE_TIMEOUT_S)")
    parser.add_argument("--lease-s", type=float, default=float(env("MICHI_LEASE_S", "10")),
                        help="a call's lease on its session record, renewed a third of it apart (MICHI_LEASE_S)")
    parser.add_argument("--no-realtime", action="store_true", help="tick as fast as the stages answer")
    parser.add_argument("--no-align-ticks", action="store_true",
                        help="let each call tick on its own phase (default: one shared 80 ms grid)")
    d = Limits()
    for flag, kind, default, what in (
            ("max-text-bytes", int, d.max_text_bytes, "one TextInput, system_text or TTS text"),
            ("max-call-text-bytes", int, d.max_call_text_bytes, "all text of one call"),
            ("context-positions", int, d.context_positions, "a call's context budget (0: the model's max_positions)"),
            ("config-timeout-s", float, d.config_timeout_s, "the config must arrive within this"),
            ("idle-timeout-s", float, d.idle_timeout_s, "no client message for this long ends the call"),
            ("max-audio-backlog-s", float, d.max_audio_backlog_s, "caller audio ahead of real time, kept"),
            ("text-tokens-per-tick", int, d.text_tokens_per_tick, "text prefilled between two ticks of a call")):
        env_key = "MICHI_" + flag.upper().replace("-", "_")
        parser.add_argument(f"--{flag}", type=kind, default=kind(env(env_key, default)), help=f"{what} ({env_key})")
    args = parser.parse_args()
    log = configure_logging("gateway")
    cfg, _ = config_of(args.model)
    store = open_store(args.redis_url)
    await store.ping()  # fail fast, with a clear message, if REDIS_URL is set and unreachable
    limits = Limits(max_calls=args.max_calls or d.max_calls, max_text_bytes=args.max_text_bytes,
                    max_call_text_bytes=args.max_call_text_bytes, context_positions=args.context_positions,
                    config_timeout_s=args.config_timeout_s, idle_timeout_s=args.idle_timeout_s,
                    max_audio_backlog_s=args.max_audio_backlog_s, text_tokens_per_tick=args.text_tokens_per_tick)
    settings = GatewaySettings(addresses(args.listen), addresses(args.backbone), addresses(args.vocoder),
                               lease_s=args.lease_s, stage_timeout_s=args.stage_timeout_s, realtime=not args.no_realtime,
                               align_ticks=not args.no_align_ticks, limits=limits)
    servicer = GatewayServicer(settings, store, load_tokenizer(cfg.backbone.tokenizer, cfg.backbone.vocab_size),
                               StreamVocab(cfg.backbone.vocab_size), cfg.latent_dim, auth_token=args.auth_token,
                               context_positions=cfg.backbone.max_positions)
    tls = (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes()) if args.tls_cert else None
    start_metrics(args.metrics_port)
    stage = Stage("gateway", ["michi.gateway.v1.Gateway"],
                  lambda server: add_to_server(servicer, server),
                  args.port, args.host, tls=tls, drain_s=args.drain_s)
    servicer.admission.on_full_changed = stage.set_full  # health `michi.capacity`: NOT_SERVING while full
    log.info("gateway_limits", **vars(limits))
    log.info("gateway_config", store="redis" if args.redis_url else "in-process", listen=settings.listen,
             backbone=settings.backbone, vocoder=settings.vocoder)
    await stage.serve_forever(on_stop=store.close)


asyncio.run(main())
