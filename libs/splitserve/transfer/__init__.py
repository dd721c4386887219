"""KV transfer between processes: the block wire format, export after prefill, fetch-or-recompute before decode."""
