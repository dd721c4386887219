"""The fused small ops of kernels/cpu_ops.c against torch's ops (and through the model)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.kernels import cpu_ops
from splitserve.model.llama import MLP, Attention, RMSNorm, apply_rope

needs_ops = pytest.mark.skipif(not cpu_ops.built(), reason="the C ops are not built for this CPU")


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in units in the last place between two float32 tensors."""
    ia, ib = a.view(torch.int32).to(torch.int64), b.view(torch.int32).to(torch.int64)
    # map the sign-magnitude bit patterns onto a monotone integer line
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


@needs_ops
@pytest.mark.parametrize("rows", [0, 1, 7, 32, 100, 513])  # serial and OpenMP (>= 64 rows) paths
@pytest.mark.parametrize("dim", [576, 64, 13])  # a vector tail and a scalar-only row
def test_rms_norm_matches_torch(rows, dim):
    gen = torch.Generator().manual_seed(rows * 1000 + dim)
    x = torch.randn(rows, dim, generator=gen) * 5
    w = torch.randn(dim, generator=gen)
    out = cpu_ops.rms_norm(x, w, 1e-5)
    ref = F.rms_norm(x, (dim,), w, 1e-5)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _ulps(out, ref) <= 8  # the mean's summation order differs from torch's


@needs_ops
@pytest.mark.parametrize("rows", [0, 1, 16, 70])
@pytest.mark.parametrize("n", [1536, 12, 5])
def test_silu_mul_matches_torch(rows, n):
    gen = torch.Generator().manual_seed(rows + n)
    gate_up = torch.randn(rows, 2 * n, generator=gen) * 6
    gate_up[:, 0] = torch.tensor([-100.0, 100.0, 0.0, -0.0] * (rows // 4 + 1))[:rows]  # far tails and zeros
    out = cpu_ops.silu_mul(gate_up)
    ref = F.silu(gate_up[:, :n]) * gate_up[:, n:]
    assert out.shape == (rows, n)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-30)


@needs_ops
@pytest.mark.parametrize("n", [1536, 1540])  # 3 pieces of 512; and a last piece ending in 4 scalar elements
def test_silu_mul_gives_a_row_the_same_bits_alone_and_split_over_threads(n):
    """16 rows of 1536 are split into pieces over the threads; 1 row runs on the calling thread."""
    gen = torch.Generator().manual_seed(n)
    gate_up = torch.randn(16, 2 * n, generator=gen) * 6
    together = cpu_ops.silu_mul(gate_up)
    for r in (0, 7, 15):
        assert torch.equal(cpu_ops.silu_mul(gate_up[r:r + 1].clone())[0], together[r])


@needs_ops
@pytest.mark.parametrize("rows", [1, 24, 65])
@pytest.mark.parametrize("head_dim", [64, 36])  # a half of 32 (vectors) and of 18 (scalar)
def test_rope_is_bit_identical_to_the_torch_form(rows, head_dim):
    gen = torch.Generator().manual_seed(rows + head_dim)
    qkv = torch.randn(rows, 14 * head_dim, generator=gen)  # rows strided like a view of the fused projection
    x = qkv[:, : 12 * head_dim].view(rows, 12, head_dim)
    cos = torch.randn(rows, 1, head_dim, generator=gen)
    signed_sin = torch.randn(rows, 1, head_dim, generator=gen)
    out = cpu_ops.rope(x, cos, signed_sin)
    assert torch.equal(out, apply_rope(x, cos, signed_sin))
    assert torch.equal(cpu_ops.rope(x.contiguous(), cos.view(rows, head_dim), signed_sin), out)


def test_refusals_name_the_argument():
    if not cpu_ops.built():
        with pytest.raises(RuntimeError, match="not built"):
            cpu_ops.rms_norm(torch.zeros(2, 4), torch.ones(4), 1e-5)
        return
    with pytest.raises(ValueError, match="x must be a contiguous float32 CPU tensor, got torch.bfloat16"):
        cpu_ops.rms_norm(torch.zeros(2, 4, dtype=torch.bfloat16), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="not contiguous"):
        cpu_ops.rms_norm(torch.zeros(4, 2).t(), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match=r"weight has shape \(3,\); x's last dim is 4"):
        cpu_ops.rms_norm(torch.zeros(2, 4), torch.ones(3), 1e-5)
    with pytest.raises(ValueError, match="must be even"):
        cpu_ops.silu_mul(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="contiguous heads"):
        cpu_ops.rope(torch.zeros(2, 4, 8).transpose(1, 2), torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match=r"cos has shape \(3, 1, 8\)"):
        cpu_ops.rope(torch.zeros(2, 4, 8), torch.zeros(3, 1, 8), torch.zeros(2, 1, 8))
    # and the ops still serve after refusing
    assert torch.equal(cpu_ops.silu_mul(torch.zeros(2, 4)), torch.zeros(2, 2))


@needs_ops
def test_the_model_modules_take_the_ops_and_agree_with_their_torch_path():
    """A layer's norm, attention's RoPE and the MLP give the same results with and without the ops."""
    from splitserve.model.llama import ModelArgs

    args = ModelArgs("llama", vocab_size=64, hidden_size=96, intermediate_size=160, num_layers=1, num_heads=6,
                     num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
                     tie_word_embeddings=True)
    torch.manual_seed(0)
    norm, mlp = RMSNorm(96, 1e-6), MLP(args)
    norm.weight.data.normal_()
    x = torch.randn(9, 96)
    with torch.no_grad():
        ref_norm, ref_mlp = norm(x), mlp(x)
        norm.fused_ops = mlp.fused_ops = True
        assert _ulps(norm(x), ref_norm) <= 8
        torch.testing.assert_close(mlp(x), ref_mlp, rtol=1e-5, atol=1e-6)
    attn = Attention(args, 0)
    assert attn.fused_ops is False  # off until LlamaModel.use_cpu_kernels turns it on


def test_the_loaded_float32_model_uses_the_ops(llm_f32):
    """use_cpu_kernels turns them on for every norm, attention and MLP of a float32 CPU model (the
    HF token-for-token tests in test_model_vs_hf.py then run through them)."""
    modules = [m for m in llm_f32.engine.runner.model.modules() if isinstance(m, (RMSNorm, Attention, MLP))]
    assert len(modules) == 30 * 4 + 1  # 2 norms, attention and MLP per layer, the final norm
    assert {m.fused_ops for m in modules} == {cpu_ops.available()}


@needs_ops
def test_pin_team_binds_each_thread_of_the_callers_team_to_its_core_and_the_team_stays():
    """A worker's engine loop pins its team once (EngineLoop pin_cores); every later kernel and torch
    op of that thread must run on the same, pinned threads, and no other thread is touched."""
    import os
    import threading

    from splitserve.config.cpus import available_cpus

    order = available_cpus()[:4][::-1]  # thread 0 on the last core: the order is the caller's
    before = os.sched_getaffinity(0)
    seen: dict = {}

    def run():
        torch.set_num_threads(len(order))
        seen["caller"] = threading.get_native_id()
        seen["tids"] = cpu_ops.pin_team(order)
        seen["affinity"] = [os.sched_getaffinity(tid) for tid in seen["tids"]]
        x = torch.randn(512, 512)
        seen["product"] = float((x @ x).abs().sum())  # torch's parallel ops on the team
        cpu_ops.silu_mul(torch.randn(256, 4096))  # a kernel's
        seen["again"] = cpu_ops.pin_team(order)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    tids = seen["tids"]
    assert len(tids) == len(order) == len(set(tids)) and tids[0] == seen["caller"], seen
    assert seen["affinity"] == [{c} for c in order], seen
    assert seen["product"] > 0 and seen["again"] == tids, seen  # the same threads ran what followed
    assert os.sched_getaffinity(0) == before  # this thread (and its own team) was left alone


@needs_ops
def test_pin_team_refuses_what_is_not_a_core_it_may_use():
    for bad in ([], [-1], [1 << 20], ["0"], [True], 3):
        with pytest.raises(ValueError, match="core"):
            cpu_ops.pin_team(bad)
    with pytest.raises(OSError, match="could not be bound to core 1000"):  # no such core here
        cpu_ops.pin_team([1000])
