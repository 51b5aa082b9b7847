"""`specdecpp serve`: the OpenAI-compatible server (FastAPI + uvicorn, engine in its own process)."""

from __future__ import annotations

import argparse
import logging
import os

from specdecpp.model_args import add_model_args, add_spec_args, engine_config_from_args, spec_from_args

log = logging.getLogger(__name__)
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024  # far above any prompt that fits a context, as text or token ids


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible server", description=__doc__)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--api-key", default=os.environ.get("SPECDECPP_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $SPECDECPP_API_KEY, else open)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting or running before new ones get 429 (default: 64; 0: unlimited)")
    s.add_argument("--served-model-name", help="model name clients send (default: the target's name)")
    s.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds in-flight requests may finish on shutdown before they are cancelled")
    s.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="larger request bodies get a 413 before they are parsed (default: %(default)s; 0: no limit)")
    s.add_argument("--allowed-origins", type=_origins, metavar="ORIGIN[,ORIGIN...]",
                   help="enable CORS for these browser origins ('*': any; default: no CORS)")
    add_model_args(p)
    add_spec_args(p)
    p.set_defaults(func=run)


def _origins(text: str) -> list[str]:
    return [origin.strip() for origin in text.split(",") if origin.strip()]


def run(args: argparse.Namespace) -> int:
    from server.app import ServerSettings, run_server

    if args.max_queue < 0:
        raise ValueError("--max-queue must be >= 0")
    if args.max_request_bytes < 0:
        raise ValueError("--max-request-bytes must be >= 0")
    engine_config = engine_config_from_args(args, spec_from_args(args))
    settings = ServerSettings(
        engine_config=engine_config.to_dict(),
        api_key=args.api_key or None,
        max_queue=args.max_queue or None,
        served_model_name=args.served_model_name,
        shutdown_grace_seconds=args.shutdown_grace,
        max_request_bytes=args.max_request_bytes or None,
        allowed_origins=args.allowed_origins,
        log_level=args.log_level,
    )
    log.info("serving on http://%s:%d (the engine loads in its own process; /health says when it is ready)",
             args.host, args.port)
    error = run_server(settings, args.host, args.port, args.log_level)
    if error:
        raise RuntimeError(f"the engine could not start: {error}")
    return 0
