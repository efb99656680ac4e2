"""Sharded serving: the split into shards (rag-index build --shards), the shard service and the router."""
