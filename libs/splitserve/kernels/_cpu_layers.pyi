# Typed surface of the C extension built from cpu_layers.c (pointers are tensors' data_ptr();
# cpu_layers.py builds the plan and hands over the step's tensors; the kernel checks every index).
# A plan row ends with the layer's K and V pages, K and V scales (0 unless 8-bit) and cache kind.
supported: int
plan_fields: int
# keep: int32 rows ascending whose output is read, `kept` of them (-1: every row, keep unread)
def decode_layers(plan: int, x: int, cos: int, sin: int, slots: int, tables: int, seq_lens: int, keep: int,
                  kept: int, layers: int, rows: int, num_blocks: int, max_blocks: int, block_size: int, hidden: int, heads: int,
                  kv_heads: int, head_dim: int, intermediate: int, eps: float, scale: float, int8: bool, /) -> None: ...
