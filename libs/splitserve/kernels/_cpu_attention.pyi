# Typed surface of the C extension built from cpu_attention.c (pointers are tensors' data_ptr();
# cpu_attention.py checks every tensor before it calls in).
def decode(q: int, k_cache: int, v_cache: int, block_tables: int, seq_lens: int, out: int, bf16: bool,
           max_blocks: int, num_blocks: int, batch: int, heads: int, kv_heads: int, head_dim: int,
           block_size: int, scale: float, /) -> None: ...
