"""The gateway role: its gRPC shell and entry point."""
