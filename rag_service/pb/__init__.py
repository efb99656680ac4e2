"""Generated gRPC/protobuf code (see scripts/gen_protos.py); do not edit."""
