"""The `splitserve` command line.

    splitserve demo [--model M] [--dtype D] [--max-tokens N] [--temperature T] [PROMPT]

`demo` runs the engine in this process and streams a chat answer to stdout: once for PROMPT, or
for every line read from standard input (an interactive session on a terminal).
"""
from __future__ import annotations

import argparse
import sys
import time


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or HF checkpoint folder (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--kv-cache-memory-gb", type=float, default=0.5, help="KV cache budget in GiB")


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
    elapsed = time.monotonic() - start
    ttft = (first - start) * 1000 if first else float("nan")
    print(f"\n[{n} tokens, first token {ttft:.0f} ms, {n / elapsed:.1f} tokens/s]", file=sys.stderr)
    return text


def cmd_demo(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description="LLM serving with disaggregated prefill and decode.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="chat with the engine in this process (streams the answer)")
    _add_engine_args(demo)
    demo.add_argument("--max-tokens", type=int, default=256)
    demo.add_argument("--temperature", type=float, default=0.7)
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument("prompt", nargs="*", help="answer this once instead of reading standard input")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"splitserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
