"""Every decoder layer of a decode step in one C call (`cpu_layers.c`), for quantized models on CPUs.

A step of a few decode rows on the default model spends more time in Python and dispatch (~20
calls a layer, 30 layers) than in its kernels. `FusedDecode.run` hands the whole layer stack to C,
which calls the same kernels the per-op path calls (their C tables, kernel_api.h): the outputs are
the same bits, so the model takes this path whenever it can and nothing else changes. It can when
the model computes in float32 with every projection held as GGUF blocks (`CpuLinear` backend
"quant"), the small ops and the attention kernel are built, the cache is float32 (it has the compute
dtype) or 8-bit (int8 or float8_e4m3fn with per-token scales, kernels/kv_quant.py: a layer's cache is
then the 4-tuple (k, v, k_scales, v_scales); new rows are quantized in C to kv_quant.quantize's bits),
and the step is decode rows only (on the CPU kernel every row of a float32 step is one, a prefill's
too: model_runner's rows_as_decodes). In the exact mode at most `max_rows` of them: more rows run the
per-op path, whose tiled float GEMM is faster there than the few-row kernel. In the int8 mode every
row count: the per-op path would run the same int8 kernel, and here a step's activations live in one
scratch buffer a call (`PIECE_ROWS` rows at most: 5.6 MiB on the default model), not in the ~20
tensors a layer that torch allocates and frees, whose holes raised a worker's peak RSS by 12-20 MiB
more over a burst. SPLITSERVE_CPU_LAYERS=torch turns it off (to compare, or to rule it out).
"""
from __future__ import annotations

import torch  # first: the extension then shares torch's OpenMP runtime (libgomp is loaded once)

from splitserve.kernels import cpu_attention, cpu_ops, cpu_quant, ext_ready, switched_on

try:
    from splitserve.kernels import _cpu_layers as _ext
except ImportError:  # not built, or a kernel it calls is missing: layers run one op at a time
    _ext = None


def available() -> bool:
    """Built (with the kernels it calls), and SPLITSERVE_CPU_LAYERS (kernel, the default, or torch)
    does not turn it off."""
    return switched_on("SPLITSERVE_CPU_LAYERS", "kernel", "torch") and ext_ready(_ext) \
        and cpu_ops.available() and cpu_attention.available() and cpu_quant.available()


class FusedDecode:
    """The layer stack of one model as the C kernel takes it: per layer the data pointers of its
    norms' weights and its projections' blocks (the tensors stay owned by the model), and per KV
    cache the pointers of its pages, added on first use."""

    # A step of more rows runs as pieces of this many, one after another, each through every layer:
    # every row attends as a decode row up to its own position, so the bits are those of one call,
    # and the scratch of a call is a piece's (5.6 MiB on the default model). A 512-row prefill chunk
    # took the same time in two pieces (353-364 ms against 357-367, 2-core Xeon); in four, 8% more.
    PIECE_ROWS = 256

    def __init__(self, model) -> None:
        """`model`: a LlamaModel for which `supported(model)` holds."""
        args = model.args
        self.args = args
        self.max_rows = cpu_quant.max_rows()
        self.int8 = False  # set by LlamaModel.set_quantized_matmul
        self._layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            bias = attn.qkv_proj.bias
            self._layers.append([
                layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                attn.qkv_proj.quant.packed.data_ptr(), cpu_quant.KIND_CODES[attn.qkv_proj.quant.kind],
                0 if bias is None else bias.data_ptr(),
                attn.o_proj.quant.packed.data_ptr(), cpu_quant.KIND_CODES[attn.o_proj.quant.kind],
                mlp.gate_up_proj.quant.packed.data_ptr(), cpu_quant.KIND_CODES[mlp.gate_up_proj.quant.kind],
                mlp.down_proj.quant.packed.data_ptr(), cpu_quant.KIND_CODES[mlp.down_proj.quant.kind],
            ])
        self._plans: dict[tuple, torch.Tensor] = {}  # the caches' pages (address, dtype) -> int64 [layers, plan_fields]

    @staticmethod
    def supported(model) -> bool:
        """Every layer of `model` can run in the kernel (see the module's notes)."""
        args = model.args
        if not available() or model.compute_dtype != torch.float32:
            return False
        if args.hidden_size % 32 or args.intermediate_size % 32 or (args.num_heads * args.head_dim) % 32:
            return False
        for layer in model.layers:
            projections = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                           layer.mlp.down_proj)
            if not all(getattr(p, "backend", None) == "quant" for p in projections):
                return False
            if not (layer.input_layernorm.fused_ops and layer.self_attn.fused_ops and layer.mlp.fused_ops):
                return False
        return True

    def accepts(self, rows: int, kv_caches, meta) -> bool:
        """This step can run here: decode rows only (the C attention kernel's tables), few enough
        for the exact mode's few-row kernel (any number in the int8 mode), and a cache the kernel
        reads."""
        k = kv_caches[0][0]
        scaled = k.dtype in cpu_attention.SCALED
        return (0 < rows and (self.int8 or rows <= self.max_rows) and meta.cpu_kernel and not meta.use_triton
                and meta.num_decodes == rows and (k.dtype == torch.float32 or scaled)
                and len(kv_caches[0]) == (4 if scaled else 2) and k.device.type == "cpu")

    def _plan(self, kv_caches) -> torch.Tensor:
        # every page's address and dtype: a cache freed and another allocated at its first page's
        # address (a model moved to another engine) must not reuse the old pointers, nor one of
        # another dtype at the very same addresses (an int8 cache freed, an fp8 one of its size
        # allocated where it was) the old cache's kind
        key = tuple((t.data_ptr(), t.dtype) for kv in kv_caches for t in kv)
        plan = self._plans.get(key)
        if plan is None:
            if len(kv_caches) != len(self._layers):
                raise ValueError(f"{len(kv_caches)} KV caches for {len(self._layers)} layers")
            rows = [fields + self._cache_fields(kv) for fields, kv in zip(self._layers, kv_caches)]
            plan = self._plans[key] = torch.tensor(rows, dtype=torch.int64)
            if plan.shape[1] != _ext.plan_fields:
                raise RuntimeError(f"plan has {plan.shape[1]} fields, the kernel takes {_ext.plan_fields}")
        return plan

    @staticmethod
    def _cache_fields(kv) -> list[int]:
        """A layer's cache in the plan: K and V pages, K and V scales (0 for a float32 cache), kind."""
        k, v, *scales = kv
        if not (k.is_contiguous() and v.is_contiguous()) or k.shape != v.shape or k.dtype != v.dtype:
            raise ValueError("K and V caches must be contiguous, of one shape and dtype")
        kind = cpu_attention.KINDS.get(k.dtype)
        if kind is None or k.dtype == torch.bfloat16:
            raise ValueError(f"the fused decode takes float32, int8 or float8_e4m3fn caches, not {k.dtype}")
        if (k.dtype in cpu_attention.SCALED) != bool(scales):
            raise ValueError(f"a {k.dtype} cache comes as (k, v, k_scales, v_scales) exactly when it is 8-bit; "
                             f"got {len(kv)} tensors")
        if scales:
            cpu_attention.check_scales(k, *scales)
        return [k.data_ptr(), v.data_ptr(), *([t.data_ptr() for t in scales] or [0, 0]), kind]

    def run(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_caches, meta) -> torch.Tensor:
        """The residual stream after every layer: x [rows, hidden] float32 (updated in place and
        returned); rope the (cos, signed sin) [rows, 1, head_dim] of the rows' positions. With
        meta.output_rows, only those rows' are (every row's K/V is written): the last layer attends
        and runs its MLP for them alone (a prefix hit's step of 16 rows samples one: 0-0.4 ms of ~20 in process)."""
        args = self.args
        plan = self._plan(kv_caches)
        x = x.contiguous()
        cos, sin = (t.contiguous() for t in rope)
        k_cache = kv_caches[0][0]
        num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
        tables = meta.decode_block_tables.contiguous()
        lens = meta.decode_seq_lens.contiguous()
        slots = meta.slot_mapping.contiguous()
        rows = x.shape[0]
        out_rows = None if meta.output_rows is None else meta.output_rows.to(torch.int32).contiguous()
        for a in range(0, rows, self.PIECE_ROWS):  # a piece's K/V is in the cache before the next attends
            b = min(rows, a + self.PIECE_ROWS)
            keep = None if out_rows is None else (out_rows[(out_rows >= a) & (out_rows < b)] - a).contiguous()
            _ext.decode_layers(plan.data_ptr(), x[a:b].data_ptr(), cos[a:b].data_ptr(), sin[a:b].data_ptr(),
                               slots[a:b].data_ptr(), tables[a:b].data_ptr(), lens[a:b].data_ptr(),
                               0 if keep is None else keep.data_ptr(), -1 if keep is None else keep.numel(),
                               len(self._layers), b - a, num_blocks, tables.shape[1], block_size, args.hidden_size,
                               args.num_heads, args.num_kv_heads, args.head_dim, args.intermediate_size,
                               float(args.rms_norm_eps), float(args.head_dim ** -0.5), self.int8)
        return x
