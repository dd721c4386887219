"""`splitserve bench`: argument parsing and the order of things; the work is in the other modules.

    splitserve bench --base-url http://127.0.0.1:8000/v1 --dataset random --input-len 256 \
        --output-len 64 --num-prompts 100 --request-rate 4 --result-json out.json --plot out.png
    splitserve bench --compare disagg=http://127.0.0.1:8000/v1 other=http://127.0.0.1:8001/v1 ...
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

DATASETS = ("random", "prefix-repetition", "sharegpt")  # = datasets.DATASETS (not imported here: numpy is slow)
DEFAULT_INPUT_LEN = 1024
DEFAULT_OUTPUT_LEN = 128
DEFAULT_PREFIX_LEN = 256


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number or 'inf'") from None
    if not (rate > 0):
        raise argparse.ArgumentTypeError(f"must be > 0 (or inf), got {value}")
    return rate


def _target(value: str) -> tuple[str, str]:
    name, sep, url = value.partition("=")
    if not sep or not name or not url:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=URL")
    from splitserve.bench.runner import normalize_base_url

    try:
        return name, normalize_base_url(url)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_bench_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1 "
                                          "(a URL without a path gets /v1)")
    where.add_argument("--compare", nargs="+", type=_target, metavar="NAME=URL",
                       help="run the same workload (prompts, arrivals) against each target in turn and print "
                            "ratios against the first")
    p.add_argument("--model", default=None, help="model name to ask for (default: the first of GET /models)")
    p.add_argument("--dataset", choices=DATASETS, default="random")
    p.add_argument("--dataset-path", default=None, help="the ShareGPT JSON file (--dataset sharegpt)")
    p.add_argument("--input-len", type=int, default=None,
                   help=f"prompt tokens (random), suffix tokens (prefix-repetition); default {DEFAULT_INPUT_LEN}")
    p.add_argument("--output-len", type=int, default=None,
                   help=f"max_tokens of each request (default {DEFAULT_OUTPUT_LEN}; sharegpt: the answer's length)")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)] (random, prefix-repetition); 0 = exact")
    p.add_argument("--prefix-len", type=int, default=None,
                   help=f"shared prefix tokens before each prompt (random: default 0; prefix-repetition: "
                        f"default {DEFAULT_PREFIX_LEN})")
    p.add_argument("--num-prefixes", type=int, default=1,
                   help="prefix-repetition: distinct prefixes, prompt i uses prefix i %% N (N = --num-prompts: "
                        "no prompt shares its prefix)")
    p.add_argument("--num-prompts", type=int, required=True)
    p.add_argument("--request-rate", type=_rate, default=math.inf,
                   help="requests per second, or inf (default): everything at once")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="shape of the gamma distribution of the gaps (1 = Poisson; <1 burstier)")
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts, lengths and arrival times")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for ignore_eos so every request generates its full output length")
    p.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                   help="SLOs for goodput: ttft:MS, tpot:MS, e2el:MS (a request is good when all hold)")
    p.add_argument("--num-warmups", type=int, default=0,
                   help="requests sent one at a time before the measured run (not recorded)")
    p.add_argument("--result-json", default=None, help="write the summary and per-request records here")
    p.add_argument("--plot", default=None, help="write a PNG of latency distributions and throughput here")
    p.add_argument("--api-key", default="", help="Bearer token (default: $SPLITSERVE_API_KEY)")
    p.add_argument("--tokenizer", default=None,
                   help="GGUF file or HF folder (default: the served model's root path, else the default model)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-request read timeout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--metrics-url", nargs="+", default=None, metavar="URL",
                   help="the /metrics endpoints of the workers that decode: the run's speculative-decoding "
                        "draft tokens, accepted tokens and acceptance rate are read from their spec_decode "
                        "counters before and after it")


def _tokenizer_path(arg: str | None, root: str | None) -> Path:
    if arg:
        path = Path(arg).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--tokenizer: no such file or folder: {path}")
        return path
    if root and Path(root).exists():
        return Path(root)
    from splitserve.model.loader import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no tokenizer: the server's model root {root!r} is not on this machine and {exc}; "
                                f"pass --tokenizer") from None


def build_workload(args, tokenizer, max_model_len: int | None) -> list:
    from splitserve.bench import datasets

    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset sharegpt needs --dataset-path FILE (the ShareGPT JSON)")
        total = min(2048, max_model_len) if max_model_len else 2048
        return datasets.sharegpt_requests(datasets.load_sharegpt(args.dataset_path), args.num_prompts,
                                          tokenizer.encode, output_len=args.output_len, seed=args.seed,
                                          max_prompt_len=min(1024, total), max_total_len=total)
    ids = datasets.candidate_token_ids(tokenizer.vocab_size, tokenizer.all_special_ids)
    input_len = args.input_len or DEFAULT_INPUT_LEN
    output_len = args.output_len or DEFAULT_OUTPUT_LEN
    if args.dataset == "random":
        reqs = datasets.random_requests(args.num_prompts, input_len, output_len, ids, range_ratio=args.range_ratio,
                                        prefix_len=args.prefix_len or 0, seed=args.seed)
    else:
        prefix_len = DEFAULT_PREFIX_LEN if args.prefix_len is None else args.prefix_len
        reqs = datasets.prefix_repetition_requests(args.num_prompts, prefix_len, input_len, output_len, ids,
                                                   num_prefixes=args.num_prefixes, range_ratio=args.range_ratio,
                                                   seed=args.seed)
    if max_model_len:
        longest = max(r.prompt_len + r.output_len for r in reqs)
        if longest > max_model_len:
            raise ValueError(f"the longest request needs {longest} tokens (prompt + output) but the server's "
                             f"max_model_len is {max_model_len}: lower --input-len/--output-len/--prefix-len")
    return reqs


def _config(args, targets, models, tokenizer_path, requests) -> dict:
    import datetime

    skip = {"func", "command", "compare", "api_key", "base_url", "model"}
    cfg = {k: v for k, v in vars(args).items() if k not in skip}
    cfg["request_rate"] = "inf" if math.isinf(args.request_rate) else args.request_rate
    cfg.update(targets={n: u for n, u in targets}, models=models, tokenizer=str(tokenizer_path),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               prompt_lens=[r.prompt_len for r in requests], output_lens=[r.output_len for r in requests])
    return cfg


def cmd_bench(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from splitserve.bench import report, runner
    from splitserve.bench.arrivals import arrival_times
    from splitserve.bench.metrics import parse_goodput, summarize
    from splitserve.config import env

    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    for flag, value in (("--num-prompts", args.num_prompts), ("--input-len", args.input_len),
                        ("--output-len", args.output_len)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    slos = parse_goodput(args.goodput)
    api_key = args.api_key or env.API_KEY.read() or None
    targets = args.compare or [("target", runner.normalize_base_url(args.base_url))]
    names = [n for n, _ in targets]
    if len(set(names)) != len(names):
        raise ValueError("--compare: every target needs its own NAME")
    arrivals = arrival_times(args.num_prompts, args.request_rate, args.burstiness, args.seed)

    infos = {name: asyncio.run(runner.fetch_server_info(url, api_key, args.model)) for name, url in targets}
    for name, info in infos.items():
        if info.model not in info.listed:
            print(f"warning: {name} lists the models {info.listed}, not {info.model!r}", file=sys.stderr)
    first = infos[names[0]]
    tok_path = _tokenizer_path(args.tokenizer, first.root)
    print(f"tokenizer: {tok_path}", file=sys.stderr)
    from splitserve.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_path)
    max_len = min((i.max_model_len for i in infos.values() if i.max_model_len), default=None)
    requests = build_workload(args, tokenizer, max_len)
    config = _config(args, targets, {n: i.model for n, i in infos.items()}, tok_path, requests)

    runs, summaries = {}, {}
    for name, url in targets:
        model = infos[name].model
        print(f"{name}: {url} model={model} dataset={args.dataset} prompts={len(requests)} "
              f"rate={config['request_rate']} burstiness={args.burstiness} "
              f"max_concurrency={args.max_concurrency}", file=sys.stderr)
        spec_before = report.spec_decode_totals(args.metrics_url) if args.metrics_url else None
        records, duration = asyncio.run(runner.run(
            url, model, requests, arrivals, max_concurrency=args.max_concurrency, api_key=api_key,
            temperature=args.temperature, ignore_eos=args.ignore_eos, num_warmups=args.num_warmups,
            progress=not args.no_progress, timeout_s=args.timeout_s))
        runs[name] = (records, duration)
        summaries[name] = summarize(records, duration, slos)
        if args.metrics_url:
            summaries[name].update(report.spec_decode_delta(spec_before, report.spec_decode_totals(args.metrics_url)))
        print(report.format_table(summaries[name], title=f"splitserve bench: {name}" if args.compare else
                                  "splitserve bench"))
        errors = [r.error for r in records if not r.success]
        if errors:
            print(f"{len(errors)} failed; first error: {errors[0]}", file=sys.stderr)
    if args.compare:
        print(report.format_compare(summaries))
    sys.stdout.flush()

    if args.result_json:
        docs = {n: report.result_document(config, summaries[n], *runs[n]) for n in names}
        if args.compare:
            document = {"config": config, "targets": {n: {k: v for k, v in d.items() if k != "config"}
                                                      for n, d in docs.items()},
                        "ratios_to_first": report.ratios(summaries)}
        else:
            document = docs[names[0]]
        report.write_json(args.result_json, document)
        print(f"wrote {args.result_json}", file=sys.stderr)
    if args.plot:
        report.plot(args.plot, runs)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if all(s["completed"] > 0 for s in summaries.values()) else 1
