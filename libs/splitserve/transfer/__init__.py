"""KV transfer between processes: the block wire format (block.py), blocks in and out of the paged
cache (pages.py), the prefill side's export (export.py) and the decode side's fetch-or-recompute
plan (fetch.py). export and fetch reach the kvstore through narrow interfaces (BlockSink,
BlockSource) that splitserve.kvstore.client.KVStoreClient implements, so they run without gRPC in tests."""
