"""The kvstore role: its gRPC shell and entry point."""
