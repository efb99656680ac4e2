"""The gRPC face: server, request validation, RPC wrapper, auth, logs, the internal Shard service."""
