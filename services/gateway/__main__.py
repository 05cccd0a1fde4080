"""python -m michi.services.gateway --port 50060 --listen 127.0.0.1:50061 --backbone ... --vocoder ..."""
import asyncio
import os
from pathlib import Path

from michi.api import config_of
from michi.model.tokenizer import StreamVocab, load_tokenizer
from michi.proto.gateway.v1 import gateway_pb2_grpc
from michi.serving.server import Stage, configure_logging, start_metrics
from michi.serving.stage_cli import stage_parser
from michi.session.store import open_store

from .server import GatewayServicer, GatewaySettings


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
    parser.add_argument("--no-realtime", action="store_true", help="tick as fast as the stages answer")
    parser.add_argument("--no-align-ticks", action="store_true",
                        help="let each call tick on its own phase (default: one shared 80 ms grid)")
    args = parser.parse_args()
    log = configure_logging("gateway")
    cfg, _ = config_of(args.model)
    store = open_store(args.redis_url)
    await store.ping()  # fail fast, with a clear message, if REDIS_URL is set and unreachable
    settings = GatewaySettings(addresses(args.listen), addresses(args.backbone), addresses(args.vocoder),
                               realtime=not args.no_realtime, align_ticks=not args.no_align_ticks)
    servicer = GatewayServicer(settings, store, load_tokenizer(cfg.backbone.tokenizer, cfg.backbone.vocab_size),
                               StreamVocab(cfg.backbone.vocab_size), cfg.latent_dim, auth_token=args.auth_token)
    tls = (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes()) if args.tls_cert else None
    start_metrics(args.metrics_port)
    stage = Stage("gateway", ["michi.gateway.v1.Gateway"],
                  lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server),
                  args.port, args.host, tls=tls, drain_s=args.drain_s)
    log.info("gateway_config", store="redis" if args.redis_url else "in-process", listen=settings.listen,
             backbone=settings.backbone, vocoder=settings.vocoder)
    await stage.serve_forever(on_stop=store.close)


asyncio.run(main())
