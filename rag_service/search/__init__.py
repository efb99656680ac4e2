"""The request path after validation: the pipeline and its stages (cache, encode, retrieve, fuse, rerank, context filter), the adaptive policy, prefetch and speculation."""
