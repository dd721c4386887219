"""Block storage of the kvstore role (host memory, byte budget, LRU, leases)."""
