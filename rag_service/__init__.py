"""rag-service: low-latency hybrid retrieval (BM25 + dense) for RAG over gRPC."""

__version__ = "0.1.0"
