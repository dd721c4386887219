"""`splitserve hf-serve`: the baseline for `splitserve bench --compare`, an OpenAI-compatible
completions server running HF transformers with static batching.

    splitserve hf-serve [--model PATH] [--dtype float32|bfloat16] [--port 8001] [--max-batch-size 32]

    GET  /v1/models        one card: id (the model file's name), root (its path), max_model_len
    POST /v1/completions   prompt: a string, token ids, or a list holding one of those; n = 1
    GET  /health

Static batching: requests queue; when the model is idle, the batch thread takes up to
--max-batch-size of them (waiting up to --batch-wait-ms after the first one arrived, so that a
burst becomes one batch), left-pads the prompts and runs one generation for the whole batch, a
manual step loop over the HF model's forward and its KV cache, until every row is done. A row
stops at its max_tokens, at EOS (unless ignore_eos), a stop token or a stop string, or when its
client goes away; a row that is done keeps its place (it is fed pad tokens) until the longest row
ends: that is the cost static batching pays, and what the per-batch log line measures (useful
tokens vs rows x steps). Requests that arrive meanwhile wait for the next batch.

The model and tokenizer load as in `benchmarks/bench_engine.py` (`run_hf`): a GGUF file is
dequantized to dense weights in --dtype. Sampling, EOS handling, stop strings and incremental
detokenization reuse splitserve's own (`Sampler`, `OutputStream`), so both servers answer the same
request the same way; only the model and the batching differ. Responses carry `x-batch-id` and
`x-batch-size` headers saying which batch served them.

Modules: this one (config, flags, start-up), `hf_batcher` (the model and the batch thread),
`hf_http` (the Starlette app).
"""
from __future__ import annotations

import dataclasses
import logging
import time

from splitserve.config.hf_serve import DTYPES, HfServeConfig

log = logging.getLogger("splitserve.hf_server")


def add_args(p) -> None:
    d = HfServeConfig()
    p.add_argument("--model", default=None,
                   help="GGUF file or HF checkpoint folder (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES))
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="0: a free port (logged)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="most requests in one static batch")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="after the first request arrived, wait this long for more before starting a batch")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")


def cmd_hf_serve(args) -> int:
    """Loads the model, binds, serves until interrupted (heavy imports here: `splitserve --help` stays quick)."""
    cfg = HfServeConfig(args.model, args.dtype, args.host, args.port, args.max_batch_size, args.batch_wait_ms,
                        args.threads)
    import socket

    import torch
    import uvicorn

    from splitserve.bench.hf_batcher import load
    from splitserve.bench.hf_http import HfServer

    # The batch thread runs the model on cfg.threads; loading on one thread here keeps its OpenMP
    # team the process's only one, as in splitserve's workers (splitserve.worker.Worker says why).
    cfg = dataclasses.replace(cfg, threads=cfg.threads or torch.get_num_threads())
    torch.set_num_threads(1)
    t0 = time.monotonic()
    loaded = load(cfg.model, cfg.dtype)
    log.info("hf-serve model loaded: model=%s dtype=%s max_model_len=%d threads=%d attention=%s in %.1fs",
             loaded.path.name, cfg.dtype, loaded.max_model_len, cfg.threads,
             loaded.model.config._attn_implementation, time.monotonic() - t0)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the gateway's (services/gateway/http.py)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot bind to {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{host}:{sock.getsockname()[1]}/v1"
    app = HfServer(loaded, cfg, lambda: log.info("hf-serve listening: url=%s max_batch_size=%d batch_wait_ms=%g",
                                                 url, cfg.max_batch_size, cfg.batch_wait_ms))
    config = uvicorn.Config(app.app, log_level="warning", access_log=False, lifespan="on", server_header=False)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        raise RuntimeError("hf-serve failed to start (see the log above)")
    return 0
