"""Triton KV kernels over an 8-bit cache (int8, fp8 e4m3fn; per-token scales), on CPU through
triton's interpreter, against kernels/kv_quant.py (the definition).

write_kv must give kv_quant.quantize's bytes and scales exactly: every int8 tie and every e4m3fn
rounding boundary (midpoints, one float32 ulp either side, subnormals, the carry into the next
exponent, saturation at 448) with a scale of exactly 1, rows of random magnitudes for the divisions.
The kernel encodes e4m3fn with integer ops rather than triton's fp32 -> fp8 cast: the interpreter's
cast mis-rounds (a mantissa carry into an odd exponent halves the value, ties go away from zero) and
triton has no fp8e4nv type before sm_89; the same integer ops run here and on the GPU.
Decode attention: against the torch reference on kv_quant.dequantize's caches within the float
tests' tolerances (tests/kernels/test_triton_kernels.py); a one-token context returns its V row,
so that reads back every byte value exactly.
What the interpreter cannot show: the GPU's own arithmetic (div.rn, flush-to-zero); the compile
test checks the PTX asks for div.rn, and kv8_selfcheck runs the comparisons on a GPU.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels (at their first call)

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from splitserve.kernels import kv_quant
from splitserve.kernels import triton_attention as kernels
from splitserve.model.attention import paged_decode_attention_torch

NAMES = ["int8", "fp8_e4m3"]
KV_HEADS, HEAD_DIM = 2, 64


def _empty_cache(name, num_blocks, block_size, gen):
    """Caches full of random bytes and scales of -1: what the kernel must not touch stays visible."""
    shape = (num_blocks, block_size, KV_HEADS, HEAD_DIM)
    values = [torch.randint(0, 127, shape, generator=gen, dtype=torch.uint8).view(kv_quant.STORAGE[name])
              for _ in "kv"]
    return values + [torch.full(shape[:3], -1.0) for _ in "kv"]


def _write_and_check(k, v, name, gen):
    """write_kv of k, v [T, KV_HEADS, HEAD_DIM] into random slots (two of them padding)."""
    tokens = k.shape[0]
    num_blocks, block_size = -(-tokens // 8) + 2, 8
    kc, vc, ks, vs = _empty_cache(name, num_blocks, block_size, gen)
    before = [t.clone() for t in (kc, vc, ks, vs)]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[0, tokens // 2]] = -1
    keep = slots >= 0
    kernels.write_kv(k, v, kc, vc, slots, ks, vs)
    for x, cache, scales, old, old_scales in ((k, kc, ks, before[0], before[2]), (v, vc, vs, before[1], before[3])):
        ref, ref_scales = kv_quant.quantize(x[keep], name)
        got = cache.view(-1, KV_HEADS, HEAD_DIM)[slots[keep]]
        wrong = (got.view(torch.uint8) != ref.view(torch.uint8)).sum().item()
        assert wrong == 0, f"{wrong} of {ref.numel()} {name} values differ from kv_quant.quantize"
        assert torch.equal(scales.view(-1, KV_HEADS)[slots[keep]], ref_scales)
        untouched = torch.ones(cache.shape[0] * cache.shape[1], dtype=torch.bool)
        untouched[slots[keep]] = False
        assert torch.equal(cache.view(-1, KV_HEADS, HEAD_DIM)[untouched].view(torch.uint8),
                           old.view(-1, KV_HEADS, HEAD_DIM)[untouched].view(torch.uint8))
        assert torch.equal(scales.view(-1, KV_HEADS)[untouched], old_scales.view(-1, KV_HEADS)[untouched])


def _rows(values, amax):
    """values packed into rows of HEAD_DIM whose first entry is +-amax (so scale == 1 exactly),
    shaped [T, KV_HEADS, HEAD_DIM] with two extra tokens for the padding slots."""
    per_row = HEAD_DIM - 1
    n_rows = -(-len(values) // per_row)
    n_rows += (-n_rows) % KV_HEADS
    body = torch.zeros(n_rows * per_row)
    body[:len(values)] = values
    rows = torch.cat([torch.full((n_rows, 1), amax), body.view(n_rows, per_row)], dim=1)
    rows[1::2, 0] = -amax
    return torch.cat([rows.view(-1, KV_HEADS, HEAD_DIM), torch.randn(2, KV_HEADS, HEAD_DIM)])


def _around(points):
    """points and their float32 neighbours one ulp either side, both signs."""
    points = points.float()
    near = torch.cat([points, torch.nextafter(points, torch.tensor(-1e30)),
                      torch.nextafter(points, torch.tensor(1e30))])
    return torch.cat([near, -near])


def _boundaries(name):
    if name == "int8":
        halves = torch.arange(-127, 127) + 0.5  # every tie of round half to even
        return torch.cat([_around(halves), torch.arange(-127.0, 128.0), torch.tensor([-0.0, 1e-40, -1e-40, 126.99])])
    finite = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (finite[1:] + finite[:-1]) / 2  # exact in float32: each a tie
    values = torch.cat([_around(mids), _around(finite), torch.tensor([-0.0, 1e-40, 2.0**-10, 3 * 2.0**-11, 447.9])])
    return values[values.abs() <= 448]  # a row's amax stays 448: scale 1


@pytest.mark.parametrize("name", NAMES)
def test_write_rounds_every_boundary_like_kv_quant(name):
    gen = torch.Generator().manual_seed(0)
    x = _rows(_boundaries(name), kv_quant.QMAX[name])
    assert torch.equal(kv_quant.quantize(x[:-2], name)[1].abs(), torch.ones(x.shape[0] - 2, KV_HEADS))
    _write_and_check(x, x.flip(0).contiguous(), name, gen)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_random_magnitudes_like_kv_quant(name, src_dtype):
    """Scales that are not powers of two (the divisions), rows from 1e-39 (subnormal amax) to 1e4,
    an all-zero row (scale 0), strided k and v from a fused projection."""
    gen = torch.Generator().manual_seed(1)
    tokens = 12
    mag = 10.0 ** (torch.rand(tokens, 2, KV_HEADS, 1, generator=gen) * 6 - 2)
    kv = torch.randn(tokens, 2, KV_HEADS, HEAD_DIM, generator=gen) * mag
    if src_dtype == torch.float32:
        kv[3, 0, 1] *= 1e-41  # amax ~1e-39: a subnormal scale
    kv[5, 1, 0] = 0.0
    kv = kv.to(src_dtype)
    _write_and_check(kv[:, 0], kv[:, 1], name, gen)


def _quantized_case(name, block_size, heads, kv_heads, head_dim, seed):
    """A decode batch (contexts of 1, a block, a partial block, several blocks) over an 8-bit cache
    written by kv_quant.quantize from rows of varied magnitude."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.tensor([1, block_size, block_size + 5, 3 * block_size + 2], dtype=torch.int32)
    num_blocks, max_blocks = 16, 4
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = []
    for _ in "kv":
        x = torch.randn(shape, generator=gen) * 10.0 ** (torch.rand(shape[:3] + (1,), generator=gen) * 2 - 1)
        caches += kv_quant.quantize(x, name)
    ids = torch.randperm(num_blocks, generator=gen)[:len(seq_lens) * max_blocks].to(torch.int32)
    tables = ids.view(len(seq_lens), max_blocks)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=gen)
    return q, caches, tables, seq_lens


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("block_size,heads,kv_heads,head_dim", [(16, 4, 2, 64), (8, 6, 2, 32), (16, 2, 1, 128)])
def test_decode_matches_torch_on_dequantized_cache(name, block_size, heads, kv_heads, head_dim):
    q, (kc, ks, vc, vs), tables, lens = _quantized_case(name, block_size, heads, kv_heads, head_dim, 2)
    scale = head_dim ** -0.5
    ref = paged_decode_attention_torch(q, kv_quant.dequantize(kc, ks), kv_quant.dequantize(vc, vs), tables, lens,
                                       scale)
    out = kernels.paged_decode_attention(q, kc, vc, tables, lens, scale, ks, vs)
    diff = (out - ref).abs().max().item()
    print(f"decode {name} bs={block_size} heads={heads}/{kv_heads} d={head_dim}: max abs diff {diff:.2e}")
    assert out.dtype == torch.float32 and diff <= 1e-5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-7)])
def test_decode_half_query(name, dtype, rtol):
    """Same bounds as the float caches' half test: rounding the fp32 result (bf16: a whole ulp, the
    interpreter truncates)."""
    q, (kc, ks, vc, vs), tables, lens = _quantized_case(name, 16, 4, 2, 64, 3)
    q = q.to(dtype)
    ref = paged_decode_attention_torch(q.float(), kv_quant.dequantize(kc, ks), kv_quant.dequantize(vc, vs),
                                       tables, lens, 0.125)
    out = kernels.paged_decode_attention(q, kc, vc, tables, lens, 0.125, ks, vs)
    assert out.dtype == dtype
    assert ((out.float() - ref).abs() <= 1e-5 + rtol * ref.abs()).all()


@pytest.mark.parametrize("name", NAMES)
def test_one_token_context_reads_every_byte_back_exactly(name):
    """With one key the softmax weight is exactly 1, so the output is the dequantized V row:
    all 256 int8 values / all 254 finite e4m3fn bytes, under scales from 1e-30 to 1e30."""
    gen = torch.Generator().manual_seed(4)
    batch, block_size = 4, 8
    codes = torch.arange(256, dtype=torch.int32)
    if name == "fp8_e4m3":
        codes = codes[(codes & 0x7F) != 0x7F]  # NaN: never written (quantize clamps first)
    raw = codes.repeat(3)[:batch * KV_HEADS * HEAD_DIM].to(torch.uint8).view(batch, KV_HEADS, HEAD_DIM)
    kc, vc, ks, vs = _empty_cache(name, batch, block_size, gen)
    vc[:, 0] = raw.view(kv_quant.STORAGE[name])
    vs[:, 0] = 10.0 ** (torch.rand(batch, KV_HEADS, generator=gen) * 60 - 30)
    ks.fill_(0.5)
    tables = torch.arange(batch, dtype=torch.int32).view(batch, 1)
    lens = torch.ones(batch, dtype=torch.int32)
    out = kernels.paged_decode_attention(torch.randn(batch, KV_HEADS, HEAD_DIM, generator=gen), kc, vc, tables,
                                         lens, 0.125, ks, vs)
    assert torch.equal(out, kv_quant.dequantize(vc[:, 0], vs[:, 0]))


def test_scale_errors_name_the_problem_before_any_launch():
    gen = torch.Generator().manual_seed(5)
    kc, vc, ks, vs = _empty_cache("int8", 2, 8, gen)
    k = torch.randn(3, KV_HEADS, HEAD_DIM)
    slots = torch.tensor([0, 1, 2])
    q, tables, lens = torch.randn(1, 4, HEAD_DIM), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    snapshot = kc.clone()
    cases = [
        ((None, None), "needs its per-token scales: k_scales and v_scales missing"),
        ((ks, None), "v_scales missing"),
        ((ks.half(), vs), r"k_scales must be a contiguous float32 tensor \[num_blocks, block_size, kv_heads\]"),
        ((ks, vs[:, :4]), r"v_scales .* = \[2, 8, 2\], got torch.float32 \[2, 4, 2\]"),
        ((ks.transpose(0, 1), vs), "not contiguous"),
    ]
    for (k_scales, v_scales), message in cases:
        with pytest.raises(ValueError, match=message):
            kernels.write_kv(k, k, kc, vc, slots, k_scales, v_scales)
        with pytest.raises(ValueError, match=message):
            kernels.paged_decode_attention(q, kc, vc, tables, lens, 1.0, k_scales, v_scales)
    assert torch.equal(kc, snapshot)
    floats = torch.zeros(2, 8, KV_HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="k_scales/v_scales were given for a torch.float32 cache"):
        kernels.write_kv(k, k, floats, floats.clone(), slots, ks, vs)
    with pytest.raises(ValueError, match="k_cache .*torch.int8.* and v_cache .*float8_e4m3fn.* must share a dtype"):
        kernels.paged_decode_attention(q, kc, vc.view(torch.uint8).view(torch.float8_e4m3fn), tables, lens, 1.0,
                                       ks, vs)


COMPILE = """
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from splitserve.kernels import triton_attention

ks = triton_attention._kernels()
assert not ks.interpret
for quant, cache in ((1, "*i8"), (2, "*u8")):
    for fn, const, ptrs in (
        (ks.write_kv, dict(KV_HEADS=2, HEAD_DIM=64, QUANT=quant, QMAX=(127.0, 448.0)[quant - 1]),
         {"k_ptr": "*bf16", "v_ptr": "*bf16", "slot_ptr": "*i64"}),
        (ks.paged_decode, dict(KV_HEADS=2, GROUP=4, GROUP_PAD=4, BLOCK_SIZE=16, HEAD_DIM=64, QUANT=quant),
         {"q_ptr": "*bf16", "out_ptr": "*bf16", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "scale": "fp32"})):
        ptrs.update(k_cache_ptr=cache, v_cache_ptr=cache, k_scale_ptr="*fp32", v_scale_ptr="*fp32")
        signature = {name: "constexpr" if name in const else ptrs.get(name, "i32") for name in fn.arg_names}
        compiled = triton.compile(ASTSource(fn, signature, const), target=GPUTarget("cuda", int(sys.argv[1]), 32))
        divs = sorted(set(re.findall(r"\\bdiv\\.[a-z.]*f32", compiled.asm["ptx"])))
        print(len(compiled.asm["cubin"]), ",".join(divs) or "-", quant, fn.fn.__name__)
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_compiles_for_a_gpu_without_one(arch):
    """The interpreter runs the kernels as Python: compile the 8-bit specializations of both kernels
    to cubins for sm_80 and sm_90 (no fp8 type needed on sm_80), in a process without
    TRITON_INTERPRET; the writer's divisions must be the correctly rounded div.rn, nothing else."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE, str(arch)], check=False, env=env, capture_output=True,
                         text=True, timeout=300)
    if run.returncode and "ptxas" in run.stderr.lower() and "not found" in run.stderr.lower():
        pytest.skip(f"this triton install cannot assemble: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.split() for line in run.stdout.strip().splitlines()]
    assert len(lines) == 4 and all(int(line[0]) > 0 for line in lines), lines
    assert [line[1] for line in lines if line[3] == "_write_kv_kernel"] == ["div.rn.f32"] * 2, lines


def test_selfcheck_passes_as_an_interpreted_dry_run():
    """kv8_selfcheck (the device check benchmarks/gpu_check.py can call) runs here on the CPU."""
    result = kernels.kv8_selfcheck("cpu", num_blocks=8)
    assert result["ok"], result
    assert all(result[name]["write_exact"] and result[name]["decode_max_abs_err"] <= 1e-5 for name in NAMES)
