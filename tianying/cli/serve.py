"""`tianying serve CKPT`: an OpenAI-compatible HTTP API and a web chat page over one checkpoint."""

from __future__ import annotations

import os
import sys

from tianying.cli._common import add_load_args, add_threads_arg
from tianying.errors import TianyingError


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API, with a web chat page",
                       description="Serve CKPT at http://HOST:PORT: the chat page at /, GET /health, GET /v1/models, "
                                   "POST /v1/chat/completions and /v1/completions (OpenAI's request and response "
                                   "shapes, streaming as server-sent events). Concurrent requests are decoded "
                                   "together in one batch, up to --max-concurrency at a time; more wait in line. "
                                   "Prompts that start like an earlier one (system prompt, earlier turns) reuse its "
                                   "cached keys/values.")
    add_load_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("TIANYING_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* routes (default: $TIANYING_API_KEY, "
                        "else no key)")
    p.add_argument("--max-concurrency", type=int, default=8, metavar="N",
                   help="requests decoded at once; each holds one KV-cache slot of the context length (default: 8)")
    p.add_argument("--prefix-cache", type=int, default=256, metavar="MIB",
                   help="memory for cached prompt prefixes, reused by later requests that start the same way "
                        "(default: 256 MiB; 0 turns prefix caching off)")
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                   help="prompt tokens computed per step, between the decode steps of running streams "
                        "(default: 512); smaller keeps streams smoother while a long prompt comes in")
    p.add_argument("--chat-template", "--template", dest="template", default=None, metavar="NAME|FILE",
                   help="chat template for /v1/chat/completions: an Aquila template name or a Jinja file "
                        "(default: the checkpoint's own)")
    add_threads_arg(p)
    p.add_argument("--allowed-origins", default=None, metavar="URL,…",
                   help="web origins whose pages may call the API from a browser (CORS), comma-separated "
                        "(default: none; the chat page at / is same-origin and needs none)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a connection may take to send a request's headers; idle and slow clients are "
                        "closed after it (default: 10)")
    p.add_argument("--max-connections", type=int, default=256, metavar="N",
                   help="open connections at most; more get 503 (default: 256)")
    p.add_argument("--flagai-api", action="store_true",
                   help="also serve FlagAI's Aquila server routes, POST /func and /stream_func (its request and "
                        "response shapes; see tianying.serve.flagai_api)")
    p.add_argument("--model-name", default=None,
                   help="model id reported by /v1/models and in responses (default: the checkpoint's folder name)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        import uvicorn

        from tianying.serve.app import create_app
    except ImportError as e:
        raise TianyingError(f"serving needs fastapi and uvicorn ({e}); install them with "
                            "`pip install 'tianying[serve]'` (or `pip install fastapi uvicorn`)") from None
    if args.max_concurrency < 1:
        raise TianyingError(f"--max-concurrency must be ≥ 1, got {args.max_concurrency}")
    if args.header_timeout <= 0 or args.max_connections < 1:
        raise TianyingError("--header-timeout must be > 0 and --max-connections ≥ 1")
    if args.prefix_cache < 0:
        raise TianyingError(f"--prefix-cache must be ≥ 0 MiB, got {args.prefix_cache}")
    if args.prefill_chunk < 1:
        raise TianyingError(f"--prefill-chunk must be ≥ 1, got {args.prefill_chunk}")
    if not 0 <= args.port <= 65535:
        raise TianyingError(f"--port must be in 0..65535, got {args.port}")
    from tianying.cli._common import load_llm

    llm = load_llm(args)
    from tianying.serve.app import LOOPBACK_HOSTS

    loopback = args.host in ("127.0.0.1", "localhost", "::1") or args.host.startswith("127.")
    origins = [o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()]
    app = create_app(llm, model_name=args.model_name, api_key=args.api_key, max_concurrency=args.max_concurrency,
                     prefix_cache_bytes=args.prefix_cache << 20, prefill_chunk=args.prefill_chunk,
                     allowed_hosts=(*LOOPBACK_HOSTS, args.host) if loopback else None, allowed_origins=origins,
                     engine_thread=False)
    if args.flagai_api:
        from tianying.serve.flagai_api import add_flagai_routes

        add_flagai_routes(app, llm, api_key=args.api_key, model_name=args.model_name)
    auth = "API key required" if args.api_key else "no API key"
    from tianying.threads import describe

    print(f"tianying serve: {llm.path} (template {llm.template}, {auth}, {describe()}) on "
          f"http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    from tianying.serve.http import config, serve_with_engine

    server = uvicorn.Server(config(app, args.host, args.port, header_timeout=args.header_timeout,
                                   max_connections=args.max_connections, log_level="info",
                                   timeout_graceful_shutdown=5))
    serve_with_engine(server, app.state.engine)
    return 0
