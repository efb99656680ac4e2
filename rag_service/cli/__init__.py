"""Command-line entry points (rag-index, rag-serve, rag-bench)."""
