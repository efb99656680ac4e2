"""The request path after validation: the Searcher protocol, the pipeline and its stages (cache, encode, retrieve,
fuse, rerank, context filter), the adaptive policy, prefetch and speculation."""
