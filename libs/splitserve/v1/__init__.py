"""Generated gRPC code for package splitserve.v1 (python -m splitserve.protogen); do not edit."""
