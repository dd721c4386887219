# Typed surface of the C extension built from cpu_attention.c (pointers are tensors' data_ptr();
# cpu_attention.py checks every tensor before it calls in). kind: 0 float32, 1 bfloat16, 2 int8,
# 3 fp8 e4m3fn (the last two with scale pointers, else 0).
supported: int
def decode(q: int, k_cache: int, v_cache: int, k_scales: int, v_scales: int, block_tables: int, seq_lens: int,
           out: int, kind: int, max_blocks: int, num_blocks: int, batch: int, heads: int, kv_heads: int,
           head_dim: int, block_size: int, scale: float, /) -> None: ...
def write_kv(k: int, v: int, k_cache: int, v_cache: int, k_scales: int, v_scales: int, slot_mapping: int,
             rows: int, num_slots: int, kv_heads: int, head_dim: int, kind: int, /) -> None: ...
