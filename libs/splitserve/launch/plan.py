"""`splitserve plan`: how much device memory a model needs for a workload, before buying or starting
anything.

    splitserve plan llama-3-70b --quantization awq --batch-size 32 --context-len 4096 --device-memory-gb 80

Per device, with tensor parallelism over T devices (weights and KV heads split by T):

    weights   the file's tensor bytes as stored, or the shape's parameters under --quantization
              (launch/plan_model.py says what each scheme stores)
    KV        batch x ceil(context / block_size) blocks x the bytes of one block
              (engine/memory.py: the very function a worker sizes its pool with)
    overhead  --overhead-gb (default 1 GiB: CUDA context, cuBLAS/Triton/NCCL workspaces, allocator
              slack) plus the activations of one step's token budget (--max-num-batched-tokens
              tokens x (4 x hidden + (q + k + v) / T + 3 x intermediate / T) values in the compute
              dtype) and float32 logits for --max-num-seqs rows of vocab / T

Every *_gb is in GiB, as kv_cache_memory_gb is (an "80 GB" A100 or H100 has 80 GiB). The KV pool is
what is left of a device after its weights and overhead, or --kv-cache-memory-gb when given (then the
plan's kv_pool_blocks is the number of blocks a worker started with that budget allocates), and the
largest batch is the pool's blocks over one sequence's blocks.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

from splitserve.config.engine import CacheConfig, SchedulerConfig, resolve_dtype
from splitserve.engine import memory
from splitserve.launch.plan_model import QUANTIZATIONS, ModelInfo, resolve_model, weight_bytes

KV_CACHE_DTYPES = ("auto", *memory.KV_DTYPES)
DEVICES = ("cuda", "cpu")
MAX_DEVICES = 1024  # devices_needed looks no further


@dataclass(frozen=True)
class PlanInputs:
    model: str | None = None
    quantization: str | None = None  # None: what a file stores; "none" for a shape
    kv_cache_dtype: str = "auto"
    batch_size: int = 1
    context_len: int | None = None  # None: the model's context length
    device_memory_gb: float = 80.0
    tensor_parallel_size: int = 1
    device: str = "cuda"
    block_size: int = CacheConfig.block_size
    kv_cache_memory_gb: float | None = None
    max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens
    max_num_seqs: int = SchedulerConfig.max_num_seqs
    overhead_gb: float = 1.0


def _compute_dtype(device: str) -> str:
    """What a worker's dtype "auto" becomes on `device` (a CUDA device is assumed to have bf16)."""
    flags: frozenset[str] = frozenset()
    if device == "cpu":
        from splitserve.model.dtype_choice import cpu_flags

        flags = cpu_flags()
    return resolve_dtype("auto", device, flags, cuda_bf16=True)[0]


def _kv_heads_per_device(info: ModelInfo, tp: int) -> int:
    """KV heads each of `tp` devices holds (replicated when there are fewer heads than devices)."""
    s = info.shape
    if s.num_heads % tp or (s.num_kv_heads % tp and tp % s.num_kv_heads):
        raise ValueError(f"--tensor-parallel-size {tp} does not split {info.name}'s {s.num_heads} attention "
                         f"heads and {s.num_kv_heads} KV heads evenly")
    return max(1, s.num_kv_heads // tp)


def _overhead(info: ModelInfo, p: PlanInputs, tp: int, act_bytes: int) -> int:
    s = info.shape
    qkv = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    per_token = 4 * s.hidden_size + (qkv + 3 * s.intermediate_size) / tp
    logits = p.max_num_seqs * s.vocab_size / tp * 4
    return int(p.overhead_gb * memory.GIB + p.max_num_batched_tokens * per_token * act_bytes + logits)


def _need(weights: int, kv: float, overhead: int, n: int) -> float:
    """Bytes on each of n devices sharing weights and KV evenly."""
    return math.ceil(weights / n) + kv / n + overhead


def _inputs_checked(p: PlanInputs, info: ModelInfo) -> PlanInputs:
    """The inputs with the model's defaults filled in; ValueError naming a flag that cannot hold."""
    context = p.context_len or info.shape.max_position_embeddings
    if context > info.shape.max_position_embeddings:
        raise ValueError(f"--context-len {context} exceeds {info.name}'s context length "
                         f"{info.shape.max_position_embeddings}")
    if p.quantization is not None and p.quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization {p.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if p.overhead_gb < 0:
        raise ValueError(f"--overhead-gb must be >= 0, got {p.overhead_gb}")
    if p.block_size < 1 or p.block_size & (p.block_size - 1):
        raise ValueError(f"--block-size must be a positive power of two, got {p.block_size}")
    quantization = p.quantization or ("none" if info.stored is None else None)
    return PlanInputs(**{**asdict(p), "context_len": context, "quantization": quantization})


def make_plan(p: PlanInputs) -> dict:
    """The plan as one flat dict (the --json output): the inputs, then bytes, then the answers."""
    info = resolve_model(p.model)
    p = _inputs_checked(p, info)
    s, tp = info.shape, p.tensor_parallel_size
    compute = _compute_dtype(p.device)
    kv_dtype = compute if p.kv_cache_dtype == "auto" else p.kv_cache_dtype
    # _inputs_checked: no quantization given means a file's stored tensors
    weights, params = weight_bytes(s, p.quantization) if p.quantization else info.stored or (0, 0)
    kv_shape = (s.num_layers, _kv_heads_per_device(info, tp), s.head_dim, p.block_size, kv_dtype)
    block_bytes = memory.kv_block_bytes(*kv_shape)
    seq_blocks = memory.blocks_for_tokens(p.context_len or s.max_position_embeddings, p.block_size)
    act_bytes = memory.kv_dtype(compute).element_bytes
    overhead = _overhead(info, p, tp, act_bytes)
    kv_device = p.batch_size * seq_blocks * block_bytes
    weights_device = math.ceil(weights / tp)
    device_bytes = int(p.device_memory_gb * memory.GIB)
    pool_blocks = _pool_blocks(p, kv_shape, device_bytes - weights_device - overhead)
    kv_reserved = pool_blocks * block_bytes if p.kv_cache_memory_gb is not None else kv_device
    per_device = weights_device + kv_reserved + overhead
    return {
        "model": info.name, "source": info.source, "stored_as": info.holds,
        **{k: v for k, v in asdict(p).items() if k != "model"},
        "compute_dtype": compute, "kv_cache_dtype_resolved": kv_dtype,
        "num_layers": s.num_layers, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
        "parameters": params, "weights_bytes": weights, "weights_bytes_per_device": weights_device,
        "kv_bytes_per_token": memory.kv_bytes_per_token(s.num_layers, s.num_kv_heads, s.head_dim,
                                                        p.block_size, kv_dtype),
        "kv_block_bytes_per_device": block_bytes, "kv_blocks_per_sequence": seq_blocks,
        "kv_bytes": kv_device * tp, "kv_bytes_per_device": kv_device,
        "overhead_bytes_per_device": overhead,
        "total_bytes": per_device * tp, "total_bytes_per_device": per_device,
        "fits": per_device <= device_bytes,
        "devices_needed": _devices_needed(info, p, weights, (kv_dtype, p.batch_size * seq_blocks), act_bytes),
        "tensor_parallel_size_needed": _tp_needed(info, p, weights, (kv_dtype, p.batch_size * seq_blocks), act_bytes),
        "kv_pool_blocks": pool_blocks, "kv_pool_tokens": pool_blocks * p.block_size,
        "max_batch_size": pool_blocks // seq_blocks,
        # a worker's longest sequence (LLMEngine: the model's positions, at most the whole pool)
        "max_model_len": min(s.max_position_embeddings, pool_blocks * p.block_size),
    }


def _pool_blocks(p: PlanInputs, kv_shape: tuple, room: int) -> int:
    """Blocks of the KV pool on each device: what a worker with --kv-cache-memory-gb allocates
    (its error when not one block fits), else what the room left on the device holds."""
    if p.kv_cache_memory_gb is not None:
        return memory.num_blocks_for_budget(p.kv_cache_memory_gb, *kv_shape)
    try:
        return memory.num_blocks_for_budget(max(0, room) / memory.GIB, *kv_shape)
    except ValueError:  # the weights and overhead leave no room for a block
        return 0


def _devices_needed(info: ModelInfo, p: PlanInputs, weights: int, kv: tuple[str, int], act_bytes: int) -> int | None:
    """Fewest devices whose memory holds the weights, the workload's KV and each one's overhead, the
    KV shared evenly (a lower bound: a TP degree must also split the heads, tensor_parallel_size_needed)."""
    s, (kv_dtype, blocks) = info.shape, kv
    kv_bytes = blocks * memory.kv_block_bytes(s.num_layers, s.num_kv_heads, s.head_dim, p.block_size, kv_dtype)
    limit = p.device_memory_gb * memory.GIB
    return next((n for n in range(1, MAX_DEVICES + 1)
                 if _need(weights, kv_bytes, _overhead(info, p, n, act_bytes), n) <= limit), None)


def _tp_needed(info: ModelInfo, p: PlanInputs, weights: int, kv: tuple[str, int], act_bytes: int) -> int | None:
    """Smallest tensor-parallel degree that splits the heads and fits the workload on each device."""
    s, (kv_dtype, blocks) = info.shape, kv
    for tp in range(1, s.num_heads + 1):
        try:
            heads = _kv_heads_per_device(info, tp)
        except ValueError:
            continue
        kv_bytes = blocks * memory.kv_block_bytes(s.num_layers, heads, s.head_dim, p.block_size, kv_dtype)
        if _need(weights, kv_bytes * tp, _overhead(info, p, tp, act_bytes), tp) <= p.device_memory_gb * memory.GIB:
            return tp
    return None


def _gib(n: float) -> str:
    return f"{n / memory.GIB:,.2f} GiB"


def format_plan(plan: dict) -> str:
    """The plan as a readable table (--json prints the dict itself)."""
    tp, quant = plan["tensor_parallel_size"], plan["quantization"] or f"as stored ({plan['stored_as']})"
    rows = [
        ("model", f"{plan['model']} ({plan['source']}), {plan['parameters'] / 1e9:,.3f} B parameters"),
        ("quantization", quant),
        ("workload", f"batch {plan['batch_size']} x context {plan['context_len']} tokens, "
                     f"blocks of {plan['block_size']}"),
        ("devices", f"{tp} x {plan['device_memory_gb']:g} GiB ({plan['device']}, compute {plan['compute_dtype']})"),
        ("weights", f"{_gib(plan['weights_bytes'])} ({plan['weights_bytes']:,} bytes), "
                    f"{_gib(plan['weights_bytes_per_device'])} per device"),
        ("KV per token", f"{plan['kv_bytes_per_token']:,.1f} bytes ({plan['kv_cache_dtype_resolved']}, "
                         f"{plan['num_layers']} layers x {plan['num_kv_heads']} KV heads x {plan['head_dim']})"),
        ("KV workload", f"{_gib(plan['kv_bytes'])}, {_gib(plan['kv_bytes_per_device'])} per device"),
        ("overhead", f"{_gib(plan['overhead_bytes_per_device'])} per device "
                     f"({plan['overhead_gb']:g} GiB fixed + activations of {plan['max_num_batched_tokens']} tokens)"),
        ("total", f"{_gib(plan['total_bytes_per_device'])} per device, {_gib(plan['total_bytes'])} in all: "
                  + ("fits" if plan["fits"] else "does NOT fit")),
        ("devices needed", f"{plan['devices_needed'] or 'more than ' + str(MAX_DEVICES)} by memory; "
                           f"tensor parallel size {plan['tensor_parallel_size_needed'] or 'none fits'}"),
        ("KV pool", f"{plan['kv_pool_blocks']:,} blocks = {plan['kv_pool_tokens']:,} tokens per device"
                    + (f" (--kv-cache-memory-gb {plan['kv_cache_memory_gb']:g})" if plan["kv_cache_memory_gb"] else "")),
        ("max batch", f"{plan['max_batch_size']:,} sequences of {plan['context_len']} tokens "
                      f"(a worker's longest sequence: {plan['max_model_len']:,} tokens)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _quantization(text: str) -> str:
    by_lower = {q.lower(): q for q in QUANTIZATIONS}
    if text.lower() not in by_lower:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(QUANTIZATIONS)}")
    return by_lower[text.lower()]


def add_plan_args(p: argparse.ArgumentParser) -> None:
    d = PlanInputs()
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="a GGUF file, a Hugging Face checkpoint folder, a config.json, or a named shape "
                        "(llama-3-8b, llama-3-70b, smollm2-135m-instruct); default: the workers' default model file")
    p.add_argument("--quantization", type=_quantization, default=None,
                   help=f"weights stored as one of {', '.join(QUANTIZATIONS)} (default: as a file stores "
                        "them; none (16-bit) for a shape)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=d.kv_cache_dtype,
                   help="KV-cache dtype; auto: the compute dtype of --device (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive(int), default=d.batch_size, help="sequences (default: %(default)s)")
    p.add_argument("--context-len", type=_positive(int), default=None,
                   help="tokens per sequence, prompt and output (default: the model's context length)")
    p.add_argument("--device-memory-gb", type=_positive(float), default=d.device_memory_gb,
                   help="memory of one device in GiB (default: %(default)s)")
    p.add_argument("--tensor-parallel-size", type=_positive(int), default=d.tensor_parallel_size,
                   help="devices the weights and KV heads are split over (default: %(default)s)")
    p.add_argument("--device", choices=DEVICES, default=d.device,
                   help="what dtype auto resolves for: cuda -> bfloat16, cpu -> this CPU's choice (default: %(default)s)")
    p.add_argument("--block-size", type=_positive(int), default=d.block_size,
                   help="tokens per KV block, as the workers' --block-size (default: %(default)s)")
    p.add_argument("--kv-cache-memory-gb", type=_positive(float), default=None,
                   help="a worker's KV budget in GiB: plan the pool it allocates (default: what the device has left)")
    p.add_argument("--max-num-batched-tokens", type=_positive(int), default=d.max_num_batched_tokens,
                   help="one step's token budget, for the activations (default: %(default)s, the workers')")
    p.add_argument("--max-num-seqs", type=_positive(int), default=d.max_num_seqs,
                   help="rows of logits in one step (default: %(default)s, the workers')")
    p.add_argument("--overhead-gb", type=float, default=d.overhead_gb,
                   help="fixed per-device overhead in GiB: CUDA context, workspaces (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def cmd_plan(args: argparse.Namespace) -> int:
    names = [f for f in PlanInputs.__dataclass_fields__]
    plan = make_plan(PlanInputs(**{name: getattr(args, name) for name in names}))
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan), file=sys.stdout)
    return 0
