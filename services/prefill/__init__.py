"""The prefill role: its gRPC shell and entry point."""
