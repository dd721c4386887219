"""Block ownership in Redis: the records workers write, the reader the gateway routes with, the embedded Redis."""
