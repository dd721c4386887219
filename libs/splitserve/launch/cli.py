"""The `splitserve` command line.

    splitserve up [--model M] [--dtype D] [--prefill-workers N] [--decode-workers N] [--redis-url URL] ...
    splitserve gateway|prefill|decode|kvstore [flags]     one role (what compose and Kubernetes run)
    splitserve generate [--target HOST:PORT] [--max-tokens N] [--temperature T] PROMPT
    splitserve demo [--model M] [--dtype D] [PROMPT]     the engine in this process, no services
    splitserve --version
    splitserve plan [MODEL] [--quantization Q] [--batch-size B] [--context-len C] ...  memory needed
    splitserve bench --base-url URL --num-prompts N ...  the serving benchmark (any OpenAI-compatible server)
    splitserve hf-serve [--model M] [--port 8001] ...     HF transformers static batching over the same API

`demo` streams a chat answer to stdout: once for PROMPT, or for every line read from standard
input (an interactive session on a terminal); Ctrl-C while it loads or at the prompt exits with
status 130, Ctrl-C during an answer stops that answer.
"""
from __future__ import annotations

import argparse
import sys
import time


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --kv-cache-memory-gb: generated from the engine config's fields (their
    defaults are the workers' too)."""
    from splitserve.config.engine import EngineConfig
    from splitserve.config.flags import add_flag, flag_name, flat_fields

    for ff in flat_fields(EngineConfig):
        if ff.name in ("model", "dtype", "kv_cache_memory_gb"):
            add_flag(p, ff, [flag_name(ff)], ff.name, ff.default, ff.default)


def _stream_chat(llm, messages: list[dict], params, out) -> str:
    engine = llm.engine
    ids = llm.tokenizer.apply_chat_template(messages)
    request_id = f"demo-{time.monotonic_ns()}"
    engine.add_request(request_id, ids, params)
    text, start, first, n = "", time.monotonic(), None, 0
    try:
        while engine.has_unfinished():
            for delta in engine.step():
                if delta.request_id != request_id:
                    continue
                first = first or time.monotonic()
                n += len(delta.new_token_ids)
                text += delta.new_text
                out.write(delta.new_text)
                out.flush()
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        out.write(" [interrupted]")
    end = time.monotonic()
    ttft = (first - start) * 1000 if first else float("nan")
    rate = (n - 1) / (end - first) if first and n > 1 and end > first else float("nan")
    print(f"\n[{n} tokens, first token {ttft:.0f} ms, then {rate:.1f} tokens/s]", file=sys.stderr)
    return text


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        return _demo(args)
    except KeyboardInterrupt:  # Ctrl-C while loading or at the prompt: leave quietly, as a shell does
        print(file=sys.stderr)
        return 130


def _demo(args: argparse.Namespace) -> int:
    from splitserve.launch.preflight import check_model

    check_model(args.model)  # before torch is imported: a bad --model fails in a moment
    from splitserve import LLM, SamplingParams

    print(f"loading {args.model or 'SmolLM2-135M-Instruct (Q4_1)'} in {args.dtype} ...", file=sys.stderr)
    llm = LLM(model=args.model, dtype=args.dtype, kv_cache_memory_gb=args.kv_cache_memory_gb)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    if args.prompt:
        _stream_chat(llm, [{"role": "user", "content": " ".join(args.prompt)}], params, sys.stdout)
        return 0
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    if interactive:
        print("Type a message and press Enter (Ctrl-D to quit, /reset to clear the conversation).", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": line})
        try:
            answer = _stream_chat(llm, history, params, sys.stdout)
        except ValueError as exc:  # e.g. the conversation outgrew the context window
            print(f"error: {exc}", file=sys.stderr)
            history.clear()
            continue
        history.append({"role": "assistant", "content": answer})


ROLES = {
    "gateway": "splitserve.services.gateway.server",
    "prefill": "splitserve.services.prefill.server",
    "decode": "splitserve.services.decode.server",
    "kvstore": "splitserve.services.kvstore.server",
    "colocated": "splitserve.services.colocated.server",
}


def cmd_generate(args: argparse.Namespace) -> int:
    from splitserve.client import stream_generate
    from splitserve.config import env

    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        sampling["seed"] = args.seed
    prompt = " ".join(args.prompt)
    kwargs = {"messages": [{"role": "user", "content": prompt}]} if args.chat else {"prompt": prompt}
    import grpc

    final = None
    try:
        api_key = args.api_key or str(env.API_KEY.read())
        for msg in stream_generate(args.target, sampling=sampling, timeout_s=args.timeout_s, api_key=api_key,
                                   tls=args.tls, tls_ca_file=args.tls_ca, **kwargs):
            sys.stdout.write(msg.text)
            sys.stdout.flush()
            final = msg
    except grpc.RpcError as exc:
        print(f"\nsplitserve: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    if final is not None and final.finish_reason:
        u, t = final.usage, final.timings
        print(f"[{final.finish_reason}: {u.prompt_tokens} prompt tokens ({u.cached_tokens} cached), "
              f"{u.completion_tokens} generated, first token {t.ttft_s * 1000:.0f} ms, total {t.e2e_s:.2f} s]",
              file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from splitserve import __version__
    from splitserve.launch.up import add_up_args, cmd_up

    parser = argparse.ArgumentParser(prog="splitserve", description="LLM serving with disaggregated prefill and decode.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Redis, the kvstore, the workers and the gateway as separate processes")
    add_up_args(up)
    up.set_defaults(func=cmd_up)
    for role in ROLES:
        sub.add_parser(role, help=f"run one {role} process (see `splitserve {role} --help`)", add_help=False)
    gen = sub.add_parser("generate", help="stream an answer from a running gateway")
    gen.add_argument("--target", default="127.0.0.1:50051", help="gateway address")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                     help="send the prompt as a chat message (default) or as raw text")
    gen.add_argument("--timeout-s", type=float, default=300.0)
    gen.add_argument("--api-key", default="", help="the gateway's API key (default: $SPLITSERVE_API_KEY)")
    gen.add_argument("--tls", action="store_true", help="connect with TLS (trusting the system's CAs)")
    gen.add_argument("--tls-ca", default="", help="connect with TLS, trusting this PEM CA certificate")
    gen.add_argument("prompt", nargs="+")
    gen.set_defaults(func=cmd_generate)
    demo = sub.add_parser("demo", help="chat with the engine in this process (streams the answer)")
    _add_engine_args(demo)
    demo.add_argument("--max-tokens", type=int, default=256)
    demo.add_argument("--temperature", type=float, default=0.7)
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument("prompt", nargs="*", help="answer this once instead of reading standard input")
    demo.set_defaults(func=cmd_demo)
    from splitserve.launch.plan import add_plan_args, cmd_plan

    plan = sub.add_parser("plan", help="the device memory a model needs for a workload (reads no weights)")
    add_plan_args(plan)
    plan.set_defaults(func=cmd_plan)
    from splitserve.bench.cli import add_bench_args, cmd_bench

    bench = sub.add_parser("bench", help="benchmark a running server over the OpenAI completions API")
    add_bench_args(bench)
    bench.set_defaults(func=cmd_bench)
    from splitserve.bench import hf_server

    hf = sub.add_parser("hf-serve", help="serve HF transformers with static batching (the baseline for bench --compare)")
    hf_server.add_args(hf)
    hf.set_defaults(func=hf_server.cmd_hf_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    import importlib

    from splitserve import lifeline, logs
    from splitserve.config import env

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        lifeline.arm_from_env()  # a child of `splitserve up`: die with it
    except ValueError as exc:
        print(f"splitserve: error: {exc}", file=sys.stderr)
        return 2
    try:
        logs.configure(logging.INFO)  # a role sets its own level again from its --log-level
        env.check()  # every SPLITSERVE_* variable, before anything starts
    except ValueError as exc:  # a bad SPLITSERVE_* value (the message names it)
        print(f"splitserve: error: {exc}", file=sys.stderr)
        return 2
    if argv and argv[0] in ROLES:  # each role parses its own flags (generated from its config)
        from splitserve.launch.preflight import PreflightError, check_role_args

        try:
            check_role_args(argv[0], argv[1:])  # a bad --model fails before the role imports torch
        except PreflightError as exc:
            print(f"splitserve {argv[0]}: error: {exc}", file=sys.stderr)
            return 2
        return importlib.import_module(ROLES[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    quiet = args.command in ("demo", "generate")  # their output is the answer
    logs.configure(logging.WARNING if quiet else getattr(args, "log_level", logging.INFO))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TimeoutError, RuntimeError) as exc:
        print(f"splitserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
