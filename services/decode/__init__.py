"""The decode role: its gRPC shell and entry point."""
