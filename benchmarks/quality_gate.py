"""Quality gate: perplexity and greedy agreement of each CPU matmul mode against the exact path.

Text: CPython's own `pydoc_data.topics` (the help texts of the language reference, English prose
with code), its topics joined in sorted key order, cut to the first --tokens tokens of the default
model's tokenizer. Every Python install carries it, so nothing is committed and the text is fixed
for a given Python version (the version is printed and written to --json).

Perplexity: strided windows. Windows of --window tokens start every --stride tokens, each a
sequence of its own from position 0. Every token but the first is scored exactly once, from the row
of the token before it in the earliest window that holds that token: the first window scores all
its rows, a later one only the rows past the previous window's end (its last row scores the token
just after it). A scored token so sees at least window - stride + 1 tokens of context past the
first window (the default 512 / 256: 257 to 512). Inside a window the tokens go through the model in chunks of --chunk rows, each chunk
attending over the window's earlier chunks in the paged KV cache, the way the engine computes a
chunked prefill or a prefix-cache hit (the engine's own `ModelRunner.prepare` builds the inputs).
In exact mode the chunk size picks the kernel of the projections: up to the few-row kernel's
limit (48 rows by default) the one decode steps run, above it a GEMM over dequantized tiles; int8
runs its integer kernel at every row count, a row's result independent of the chunking. Logits are float32;
perplexity = exp(mean negative log-likelihood), accumulated in float64.

Greedy agreement: 16 fixed prompts, --greedy-tokens greedy tokens each (ignore_eos) through
`LLM.generate`, compared position by position with the exact mode's: the fraction of identical
tokens and of identical whole outputs.

Modes (each a float32 model of its own, loaded one after the other):
  exact   `quantized_matmul="exact"`: float32 arithmetic on weights dequantized from the GGUF
          blocks, equal to HF transformers (before that option exists: today's default path);
  int8    `quantized_matmul="int8"`: activations quantized per block to 8 bits, integer dot
          products (skipped, and said so, while the option does not exist);
  float   SPLITSERVE_CPU_QUANT=off: the weights dequantized once to float32 copies at load, the
          plain float32 GEMM (a check of the exact path: they should agree to ~1e-6);
  kv-D    exact, with the KV cache stored as D (`--kv-cache-dtype`: bfloat16, float16, fp8_e4m3,
          int8), on the exact mode's weights (no second load): what the cache's precision costs.
Target: every mode's perplexity within 1% of exact's.

    .venv/bin/python benchmarks/quality_gate.py                  # 8192 tokens, all modes
    .venv/bin/python benchmarks/quality_gate.py --tokens 1024 --modes exact,float --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import time
from typing import NamedTuple

import torch

TARGET_PPL_RATIO = 0.01  # |ppl(mode) / ppl(exact) - 1| at most this
KV_MODES = ("kv-bfloat16", "kv-float16", "kv-fp8_e4m3", "kv-int8")
MODES = ("exact", "int8", "float") + KV_MODES
# prompts of the greedy-agreement check: short, varied English (stories, facts, code, lists)
PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n",
    "The three primary colors are",
    "Water boils at a temperature of",
    "To make a cup of tea, first",
    "The best way to learn a new language is",
    "In 1969, the first humans",
    "A list of fruits: apple, banana,",
    "The function below sorts a list of numbers:\n",
    "My favourite season is autumn because",
    "The quick brown fox",
    "Photosynthesis is the process by which",
    "Here is a short poem about the moon:\n",
    "The main difference between a cat and a dog is",
    "import json\n\nwith open(\"data.json\") as f:\n",
)


class Perplexity(NamedTuple):
    ppl: float
    nll_sum: float  # natural log, float64 sum over the scored tokens
    num_scored: int  # tokens - 1
    num_evaluated: int  # token rows the model computed (windows overlap by window - stride)
    seconds: float


class Greedy(NamedTuple):
    outputs: list[list[int]]  # [prompts][greedy tokens]
    seconds: float


@dataclasses.dataclass
class ModeResult:
    mode: str
    perplexity: Perplexity
    greedy: Greedy
    load_seconds: float


# ----------------------------------------------------------------------------- text
def corpus_text() -> str:
    """The fixed English text: every pydoc topic, in sorted key order, separated by a blank line."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def corpus_tokens(tokenizer, num_tokens: int) -> list[int]:
    """The first `num_tokens` token ids of the text (ValueError when the text is shorter)."""
    if num_tokens < 2:
        raise ValueError(f"tokens must be at least 2 (one context token and one scored), got {num_tokens}")
    text = corpus_text()
    # encode a prefix only (the whole text is ~120K tokens); 8 characters a token is ample for English
    ids = tokenizer.encode(text[: num_tokens * 8])
    if len(ids) < num_tokens:
        ids = tokenizer.encode(text)
    if len(ids) < num_tokens:
        raise ValueError(f"tokens: the text has only {len(ids)} tokens, {num_tokens} asked for")
    return ids[:num_tokens]


# ----------------------------------------------------------------------------- models
def quantized_matmul_supported() -> bool:
    """Whether ModelConfig has the `quantized_matmul` field (the exact/int8 switch)."""
    from splitserve.config.engine import ModelConfig

    return any(f.name == "quantized_matmul" for f in dataclasses.fields(ModelConfig))


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def load_mode(mode: str, model: str | None = None, kv_cache_memory_gb: float = 0.1, exact=None):
    """A float32 LLM computing its projections the way `mode` says (see the module docstring); a kv-D
    mode shares the weights of `exact` (the exact mode's LLM) when given."""
    from splitserve import LLM

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode in KV_MODES:
        kv = mode.removeprefix("kv-")
        if exact is not None:
            return exact.with_config(kv_cache_dtype=kv, kv_cache_memory_gb=kv_cache_memory_gb)
        return LLM(model=model, dtype="float32", kv_cache_memory_gb=kv_cache_memory_gb,
                   quantized_matmul="exact", kv_cache_dtype=kv)
    kwargs = {}
    if mode in ("exact", "int8") and quantized_matmul_supported():
        kwargs["quantized_matmul"] = mode
    elif mode == "int8":
        raise ValueError("mode int8: this splitserve has no ModelConfig.quantized_matmul option yet")
    # the float copies are chosen at load; the exact modes load with the variable unset
    with _env("SPLITSERVE_CPU_QUANT", "off" if mode == "float" else None):
        return LLM(model=model, dtype="float32", kv_cache_memory_gb=kv_cache_memory_gb, **kwargs)


# ----------------------------------------------------------------------------- perplexity
@torch.inference_mode()
def window_logits(llm, token_ids: list[int], chunk: int) -> torch.Tensor:
    """Logits [n, vocab] (float32) of every position of one window, as one sequence from position 0,
    computed in chunks of `chunk` rows over the paged KV cache. The window's blocks are taken from
    the engine's block manager and given back (never hashed: the prefix cache is left as it was);
    the engine must be idle."""
    from splitserve.engine.scheduler import ScheduledSeq
    from splitserve.engine.sequence import Sequence
    from splitserve.sampling_params import SamplingParams

    engine = llm.engine
    if engine.has_unfinished():
        raise RuntimeError("window_logits drives the model directly: the engine must have no requests")
    n = len(token_ids)
    if n > engine.max_model_len:
        raise ValueError(f"window: {n} tokens exceed the engine's max_model_len {engine.max_model_len}")
    seq = Sequence(f"quality-gate-{id(token_ids)}", token_ids, SamplingParams(max_tokens=1),
                   engine.config.cache.block_size, engine.namespace())
    bm, runner = engine.block_manager, engine.runner
    if not bm.allocate_slots(seq.seq_id, n):
        raise RuntimeError(f"the KV pool has {bm.num_free_blocks} free blocks of {engine.config.cache.block_size} "
                           f"tokens, too few for a {n}-token window: raise --kv-cache-memory-gb or lower --window")
    out, kv_layers = [], engine.kv_cache.layers
    try:
        for start in range(0, n, chunk):
            seq.num_computed_tokens = start
            inputs = runner.prepare([ScheduledSeq(seq, min(chunk, n - start))])
            hidden = engine.model(inputs.input_ids, inputs.positions, kv_layers, inputs.meta)
            out.append(engine.model.compute_logits(hidden).float())
    finally:
        bm.free(seq.seq_id)
    return torch.cat(out)


def perplexity(llm, token_ids: list[int], window: int = 512, stride: int = 256, chunk: int = 32) -> Perplexity:
    """Strided-window perplexity of `token_ids` (the method: the module docstring)."""
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    t0 = time.perf_counter()
    n = len(token_ids)
    nll, scored, evaluated = 0.0, 0, 0
    next_pos = 0  # the first position whose row (its prediction of the token after it) is unscored
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        lo, hi = max(next_pos, begin), min(end, n - 1)  # rows of positions lo..hi-1 score tokens lo+1..hi
        if hi > lo:
            logits = window_logits(llm, token_ids[begin:end], chunk)  # [end - begin, vocab]
            evaluated += end - begin
            targets = torch.tensor(token_ids[lo + 1:hi + 1], dtype=torch.long)
            logprobs = torch.log_softmax(logits[lo - begin:hi - begin].double(), dim=-1)
            nll -= logprobs.gather(1, targets[:, None]).sum().item()
            scored += hi - lo
            next_pos = hi
        if end == n:
            break
    return Perplexity(math.exp(nll / scored), nll, scored, evaluated, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- greedy agreement
def greedy(llm, prompts: tuple[str, ...] = PROMPTS, num_tokens: int = 32) -> Greedy:
    from splitserve import SamplingParams

    t0 = time.perf_counter()
    outs = llm.generate(list(prompts), SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True))
    return Greedy([o.token_ids for o in outs], time.perf_counter() - t0)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Fraction of identical tokens (position by position) and of identical whole outputs."""
    if len(a) != len(b):
        raise ValueError(f"agreement: {len(a)} outputs against {len(b)}")
    same = sum(x == y for oa, ob in zip(a, b) for x, y in zip(oa, ob))
    total = sum(max(len(oa), len(ob)) for oa, ob in zip(a, b))
    return {"token_agreement": same / total if total else 1.0,
            "output_agreement": sum(oa == ob for oa, ob in zip(a, b)) / len(a) if a else 1.0}


# ----------------------------------------------------------------------------- driver
def run_mode(mode: str, token_ids: list[int] | None, args: argparse.Namespace,
             exact=None) -> tuple[ModeResult, list[int]]:
    """Loads `mode`, measures it and drops it (one model in memory at a time, but for `exact`, the
    exact mode's LLM that kv-D modes share). `token_ids` None: cut the text with this model's
    tokenizer (every mode loads the same file, so the same tokenizer)."""
    t0 = time.perf_counter()
    llm = load_mode(mode, args.model, args.kv_cache_memory_gb, exact)
    result, token_ids = measure(mode, llm, token_ids, args, time.perf_counter() - t0)
    del llm
    gc.collect()
    return result, token_ids


def measure(mode: str, llm, token_ids: list[int] | None, args: argparse.Namespace,
            load_s: float = 0.0) -> tuple[ModeResult, list[int]]:
    """Perplexity and greedy outputs of a loaded mode."""
    if token_ids is None:
        token_ids = corpus_tokens(llm.tokenizer, args.tokens)
    ppl = perplexity(llm, token_ids, args.window, args.stride, args.chunk)
    gen = greedy(llm, PROMPTS[: args.prompts], args.greedy_tokens)
    return ModeResult(mode, ppl, gen, load_s), token_ids


def summarize(results: list[ModeResult]) -> dict:
    """Per mode: perplexity, its ratio to exact's, the target's verdict and greedy agreement with exact."""
    exact = next((r for r in results if r.mode == "exact"), None)
    rows = {}
    for r in results:
        row = {"perplexity": r.perplexity.ppl, "scored_tokens": r.perplexity.num_scored,
               "ppl_seconds": r.perplexity.seconds, "greedy_seconds": r.greedy.seconds,
               "load_seconds": r.load_seconds}
        if exact is not None:
            ratio = r.perplexity.ppl / exact.perplexity.ppl
            row |= {"ratio_to_exact": ratio, **agreement(exact.greedy.outputs, r.greedy.outputs),
                    "verdict": "PASS" if abs(ratio - 1) <= TARGET_PPL_RATIO else "MISS"}
        rows[r.mode] = row
    return rows


def print_table(rows: dict, args: argparse.Namespace, num_tokens: int) -> None:
    print(f"quality gate: {num_tokens} tokens of pydoc_data.topics (Python {sys.version.split()[0]}), "
          f"windows {args.window} / stride {args.stride}, chunks of {args.chunk} rows; greedy: "
          f"{args.prompts} prompts x {args.greedy_tokens} tokens")
    header = f"{'mode':<11} {'perplexity':>10} {'/ exact':>9} {'same tokens':>11} {'same outputs':>12} {'s':>6}  target"
    print(header + "\n" + "-" * len(header))
    for mode, row in rows.items():
        ratio = f"{row['ratio_to_exact']:.6f}" if "ratio_to_exact" in row else "-"
        tok = f"{row['token_agreement']:.3f}" if "token_agreement" in row else "-"
        out = f"{row['output_agreement']:.3f}" if "output_agreement" in row else "-"
        print(f"{mode:<11} {row['perplexity']:>10.4f} {ratio:>9} {tok:>11} {out:>12} "
              f"{row['ppl_seconds'] + row['greedy_seconds']:>6.1f}  {row.get('verdict', '-')}")
    print(f"(target: perplexity within {TARGET_PPL_RATIO:.0%} of exact; same tokens / outputs: greedy "
          "agreement with exact, position by position / whole outputs)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the text to score")
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--stride", type=int, default=256, help="tokens between window starts")
    p.add_argument("--chunk", type=int, default=32, help="rows per model call inside a window")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"greedy prompts (1..{len(PROMPTS)})")
    p.add_argument("--greedy-tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)} (exact first)")
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--kv-cache-memory-gb", type=float, default=0.1,
                   help="KV pool of each mode's engine, GiB (a 512-token window of the default model: 22 MiB)")
    p.add_argument("--json", metavar="FILE", help="write the results here")
    args = p.parse_args(argv)
    if not args.kv_cache_memory_gb > 0:
        p.error("--kv-cache-memory-gb must be > 0")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json!r}: its folder does not exist")
    for name in ("window", "stride", "chunk", "greedy_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.tokens < 2:
        p.error("--tokens must be >= 2")
    if args.stride > args.window:
        p.error(f"--stride ({args.stride}) must be at most --window ({args.window})")
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts must be in [1, {len(PROMPTS)}]")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        p.error(f"--modes takes distinct names among {', '.join(MODES)}, got {args.modes!r}")
    if "int8" in modes and not quantized_matmul_supported():
        print("int8: skipped, this splitserve has no quantized_matmul option yet", file=sys.stderr)
        modes.remove("int8")
    args.modes = sorted(modes, key=MODES.index)  # exact first: the others are compared with it
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    results, token_ids, exact = [], None, None
    for mode in args.modes:
        print(f"[quality] {mode}: loading and scoring", file=sys.stderr, flush=True)
        try:
            if mode == "exact" and any(m in KV_MODES for m in args.modes):  # kept: the kv-D modes share it
                t0 = time.perf_counter()
                exact = load_mode(mode, args.model, args.kv_cache_memory_gb)
                result, token_ids = measure(mode, exact, token_ids, args, time.perf_counter() - t0)
            else:
                result, token_ids = run_mode(mode, token_ids, args, exact)
        except (ValueError, RuntimeError) as exc:  # a bad size for this text, model or pool: no traceback
            sys.exit(f"quality_gate: {mode}: {exc}")
        results.append(result)
    rows = summarize(results)
    print_table(rows, args, len(token_ids))
    if args.json:
        out = {"args": {k: v for k, v in vars(args).items()}, "python": sys.version.split()[0],
               "torch_threads": torch.get_num_threads(), "modes": rows,
               "greedy_outputs": {r.mode: r.greedy.outputs for r in results}}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"results written to {args.json}")
    if any(row.get("verdict") == "MISS" for row in rows.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
