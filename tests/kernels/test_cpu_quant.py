"""The quantized projections of kernels/cpu_quant.c: the weights they unpack are GGUF's own float32
values, the products (the few-row kernel and the tiled GEMM of many rows) match a float64
reference, the embedding gathers GGUF's own rows, and the loaded model computes with them."""
from __future__ import annotations

import dataclasses
import numpy as np
import pytest
import torch

from splitserve.kernels import cpu_quant
from splitserve.kernels.cpu_quant import QuantWeight
from splitserve.model.llama import CpuLinear

needs_kernel = pytest.mark.skipif(not cpu_quant.built(), reason="the quantized kernel is not built for this CPU")


KINDS = ["Q4_0", "Q4_1", "Q8_0"]


def random_blocks(kind: str, n: int, k: int, seed: int, signed_scales: bool = False) -> np.ndarray:
    """GGUF-style raw blocks [n, k / 32 * bytes] with random codes and sane float16 scales (of
    either sign with `signed_scales`: Q4_0's code 8 then gives GGUF a -0.0 weight)."""
    rng = np.random.default_rng(seed)
    size = cpu_quant.BLOCK_BYTES[kind]
    raw = rng.integers(0, 256, (n, k // 32, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, (n, k // 32)) * (rng.choice([-1, 1], (n, k // 32)) if signed_scales else 1)
    raw[:, :, 0:2] = scales.astype(np.float16).view(np.uint8).reshape(n, k // 32, 2)
    if kind == "Q4_1":
        raw[:, :, 2:4] = rng.uniform(-0.3, 0.0, (n, k // 32)).astype(np.float16).view(np.uint8).reshape(n, k // 32, 2)
    return raw.reshape(n, -1)


@pytest.fixture(scope="module")
def gguf_tensors():
    import gguf

    from splitserve.model.loader import default_model_path

    reader = gguf.GGUFReader(str(default_model_path()))
    return {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("name,rows", [("blk.0.ffn_gate.weight", None), ("blk.3.attn_k.weight", None),
                                       ("token_embd.weight", 256)])
def test_unpacking_gives_ggufs_own_dequantized_values(gguf_tensors, name, rows):
    import gguf

    t = gguf_tensors[name]
    raw = np.asarray(t.data)[:rows]
    reference = np.asarray(gguf.quants.dequantize(raw, t.tensor_type), dtype=np.float32)
    w = QuantWeight.from_gguf(t.tensor_type.name, raw)
    assert w.shape == reference.shape
    assert torch.equal(w.dequantize(), torch.from_numpy(reference))
    if cpu_quant.built():  # the kernel's own unpacking: a one-hot x reads each weight back exactly
        eye = torch.eye(w.shape[1])[:48]
        assert torch.equal(cpu_quant.linear(eye, w), torch.from_numpy(reference[:, :48]).t().contiguous())


def ggufs_values(kind: str, raw: np.ndarray) -> np.ndarray:
    import gguf

    return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]), dtype=np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_unpacks_to_ggufs_bits(kind):
    """Random blocks of every format (scales of both signs): the torch reference (`dequantize`) and
    the C unpacking (through the embedding gather, which copies weights out unchanged) give GGUF's
    float32 values bit for bit, signed zeros included."""
    raw = random_blocks(kind, 23, 96, seed=11, signed_scales=True)
    ref = ggufs_values(kind, raw)
    w = QuantWeight.from_gguf(kind, raw)
    assert w.shape == (23, 96) and w.kind == kind
    assert np.array_equal(w.dequantize().numpy().view(np.uint32), ref.view(np.uint32))
    if cpu_quant.built():
        rows = cpu_quant.embedding(torch.arange(23), w)
        assert np.array_equal(rows.numpy().view(np.uint32), ref.view(np.uint32))


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (2, 5, 64), (3, 4, 96), (4, 7, 256), (5, 6, 64), (6, 3, 96),
                                   (7, 13, 576), (8, 10, 256), (16, 9, 1536), (50, 6, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_products_match_a_float64_reference(kind, m, n, k, bias):
    """Every shape of the register kernel (1 to 8 rows of x, the tile's weight rows in chunks with
    their remainders) and of the L1 tile (rows of x in 3s, weight rows in 4s), every format."""
    w = QuantWeight.from_gguf(kind, random_blocks(kind, n, k, seed=m * 100 + n))
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    ref = x.double() @ w.dequantize().double().t() + (b.double() if bias else 0)
    out = cpu_quant.linear(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def assert_near_reference(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
    """out against x @ w^T (+ bias) in float64, each element within 1e-5 of the sum of its products'
    magnitudes (float32 summation over K in a BLAS's order: its error grows with those, not with
    the result, which cancels)."""
    x, w = x.double(), w.double()
    ref = x @ w.t() + (0 if bias is None else bias.double())
    scale = x.abs() @ w.abs().t() + (0 if bias is None else bias.double().abs())
    excess = ((out.double() - ref).abs() - 1e-5 * scale).max().item()
    assert excess <= 0, f"max error beyond the tolerance: {excess}"


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [49, 64, 512])
def test_many_rows_run_a_gemm_over_dequantized_tiles(kind, m, monkeypatch):
    """The prefill path (`linear_tiled`): a float32 GEMM over GGUF's own values (the float32
    weights of the model before the blocks were its only copy), against a float64 reference; the
    weight whole in the thread's buffer, or in tiles of rows (a small buffer: 3 tiles, the last one
    short), with and without a bias."""
    n, k = 70, 576
    raw = random_blocks(kind, n, k, seed=m)
    w, ref_w = QuantWeight.from_gguf(kind, raw), torch.from_numpy(ggufs_values(kind, raw))
    gen = torch.Generator().manual_seed(m)
    x, b = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    whole = cpu_quant.linear_tiled(x, w)
    assert whole.dtype == torch.float32 and whole.shape == (m, n)
    assert_near_reference(whole, x, ref_w)
    monkeypatch.setattr(cpu_quant, "TILE_FLOATS", 32 * k)  # 32 weight rows a tile: 32 + 32 + 6
    monkeypatch.setattr(cpu_quant._scratch, "tile", torch.empty(32 * k))
    tiled = cpu_quant.linear_tiled(x.view(1, m, k), w, b)
    assert tiled.shape == (1, m, n)  # leading dims kept
    assert_near_reference(tiled[0], x, ref_w, b)


@needs_kernel
def test_the_tile_buffer_is_refilled_for_every_weight():
    """Two weights of one shape through the one reused buffer, alternately: each product is its own
    weight's (no GEMM keeps a stale copy of the buffer keyed by its address)."""
    ws = [QuantWeight.from_gguf("Q4_1", random_blocks("Q4_1", 64, 128, seed=s)) for s in (1, 2)]
    x = torch.randn(100, 128, generator=torch.Generator().manual_seed(3))
    for i in (0, 1, 0, 1):
        assert_near_reference(cpu_quant.linear_tiled(x, ws[i]), x, ws[i].dequantize())


@needs_kernel
def test_embedding_gathers_rows_and_refuses_bad_ids():
    raw = random_blocks("Q8_0", 50, 64, seed=4)
    w = QuantWeight.from_gguf("Q8_0", raw)
    ref = torch.from_numpy(ggufs_values("Q8_0", raw))
    ids = torch.tensor([[3, 49, 0], [3, 7, 7]])
    assert torch.equal(cpu_quant.embedding(ids, w), ref[ids])
    assert torch.equal(cpu_quant.embedding(ids.to(torch.int32), w), ref[ids])
    assert cpu_quant.embedding(torch.zeros(0, dtype=torch.int64), w).shape == (0, 64)
    many = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(5))  # the threaded gather
    assert torch.equal(cpu_quant.embedding(many, w), ref[many])
    with pytest.raises(ValueError, match="ids: 50 at position 2 is outside the 50 rows"):
        cpu_quant.embedding(torch.tensor([1, 2, 50]), w)
    with pytest.raises(ValueError, match="ids: -1 at position 0"):
        cpu_quant.embedding(torch.tensor([-1]), w)
    with pytest.raises(ValueError, match="ids must be an integer CPU tensor, got torch.float32"):
        cpu_quant.embedding(torch.tensor([1.0]), w)
    with pytest.raises(ValueError, match="ids must be an integer CPU tensor, got list"):
        cpu_quant.embedding([1, 2], w)


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
def test_a_row_gives_the_same_bits_alone_and_in_any_batch(kind):
    """Every row count takes one of three paths (registers up to 8 rows, the L1 tile above, the
    GEMM past the kernel's rows): each gives a row the same bits."""
    w = QuantWeight.from_gguf(kind, random_blocks(kind, 37, 512, seed=1))
    x = torch.randn(20, 512, generator=torch.Generator().manual_seed(2))
    batch = cpu_quant.linear(x, w)
    for rows in range(1, 12):
        for start in (0, 20 - rows):
            assert torch.equal(cpu_quant.linear(x[start:start + rows], w), batch[start:start + rows]), (rows, start)
    assert cpu_quant.linear(x[:0], w).shape == (0, 37)
    assert cpu_quant.linear(x.view(4, 5, 512), w).shape == (4, 5, 37)  # leading dims kept


@needs_kernel
def test_refusals_name_the_argument():
    w = QuantWeight.from_gguf("Q4_1", random_blocks("Q4_1", 8, 64, seed=3))
    with pytest.raises(ValueError, match="x has 32 features; the weight takes 64"):
        cpu_quant.linear(torch.zeros(2, 32), w)
    with pytest.raises(ValueError, match=r"bias must be contiguous float32 \[8\]"):
        cpu_quant.linear(torch.zeros(2, 64), w, torch.zeros(7))
    with pytest.raises(ValueError, match=r"packed must be contiguous uint8 \[2, 2, 136\] for a Q8_0"):
        cpu_quant.linear(torch.zeros(2, 64), dataclasses.replace(w, kind="Q8_0"))
    with pytest.raises(ValueError, match=r"Q4_1 data must be uint8 \[rows, blocks \* 20\]"):
        QuantWeight.from_gguf("Q4_1", np.zeros((4, 30), np.uint8))
    with pytest.raises(ValueError, match=r"Q8_0 data must be uint8 \[rows, blocks \* 34\], got uint8 \(0, 34\)"):
        QuantWeight.from_gguf("Q8_0", np.zeros((0, 34), np.uint8))
    with pytest.raises(ValueError, match="unsupported block format 'Q5_0'"):
        QuantWeight.from_gguf("Q5_0", np.zeros((4, 22), np.uint8))
    with pytest.raises(ValueError, match="x has 32 features; the weight takes 64"):
        cpu_quant.linear_tiled(torch.zeros(60, 32), w)


@needs_kernel
def test_cpu_linear_takes_the_kernel_up_to_its_rows_and_the_gemm_above(monkeypatch):
    """From the blocks alone (no float weight held): the kernel up to its rows, the tiled GEMM above."""
    monkeypatch.setenv("SPLITSERVE_CPU_QUANT_ROWS", "4")
    w = QuantWeight.from_gguf("Q4_1", random_blocks("Q4_1", 24, 96, seed=5))
    b = torch.randn(24, generator=torch.Generator().manual_seed(7))
    lin = CpuLinear(None, b, torch.float32, w)
    assert lin.backend == "quant" and lin.weight_t is None and lin.packed is None
    assert [t.numel() for t in lin.buffers()] == [24]  # the bias: no float copy of W
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(6))
    assert torch.equal(lin(x[:4]), cpu_quant.linear(x[:4], w, b))  # the kernel
    assert torch.equal(lin(x), cpu_quant.linear_tiled(x, w, b))  # the GEMM over dequantized tiles
    assert_near_reference(lin(x), x, w.dequantize(), b)
    # given a float weight too, it is checked and dropped
    assert CpuLinear(w.dequantize(), None, torch.float32, w).weight_t is None
    with pytest.raises(ValueError, match=r"Q4_1 weight \(24, 96\) does not match the float weight \(24, 64\)"):
        CpuLinear(torch.zeros(24, 64), None, torch.float32, w)
    with pytest.raises(ValueError, match=r"bias has shape \(23,\); the weight has 24 outputs"):
        CpuLinear(None, torch.zeros(23), torch.float32, w)
    with pytest.raises(ValueError, match="needs a weight or its quantized blocks"):
        CpuLinear(None, None, torch.float32)
    # not float32 (or the kernel off): the blocks' values as a float weight, the usual GEMM
    bf16 = CpuLinear(None, None, torch.bfloat16, w)
    assert bf16.quant is None and torch.equal(bf16.weight_t.t(), w.dequantize().to(torch.bfloat16))


@needs_kernel
def test_the_loaded_model_computes_its_float32_weights_from_the_blocks(llm_f32):
    """Every projection and the tied LM head carry blocks, fused and permuted like the float32
    weights: a one-hot x reads the same values back through the kernel and through the GEMM."""
    model = llm_f32.engine.model
    linears = {name: m for name, m in model.named_modules() if isinstance(m, CpuLinear)}
    kinds = {name: (m.quant.kind if m.quant is not None else None) for name, m in linears.items()}
    assert kinds["lm_head"] == "Q8_0"
    assert {kinds[f"layers.{i}.{p}"] for i in range(model.args.num_layers)
            for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")} == {"Q4_1"}
    for name in ("layers.0.self_attn.qkv_proj", "layers.29.mlp.gate_up_proj", "layers.7.mlp.down_proj", "lm_head"):
        lin = linears[name]
        eye = torch.eye(lin.in_features)[: lin.quant_rows]
        through_kernel = lin(eye)
        saved, lin.quant_rows = lin.quant_rows, -1
        try:
            through_gemm = lin(eye)
        finally:
            lin.quant_rows = saved
        assert torch.equal(through_kernel, through_gemm), name


@needs_kernel
def test_the_tile_buffer_made_in_inference_mode_serves_calls_outside_it():
    """A thread's first tiled call inside inference mode (an engine step) makes the shared buffer;
    a later call outside it (a user's module call) must still write into it."""
    import threading

    w = QuantWeight.from_gguf("Q4_1", random_blocks("Q4_1", 9, 64, seed=3))
    x = torch.randn(60, 64, generator=torch.Generator().manual_seed(1))
    out, errors = [], []

    def run():
        try:
            with torch.inference_mode():
                out.append(cpu_quant.linear_tiled(x, w).clone())
            out.append(cpu_quant.linear_tiled(x, w))
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)  # a fresh thread: its own buffer, made in inference mode
    thread.start()
    thread.join()
    assert not errors, errors
    assert torch.equal(out[0], out[1])
