"""Bottom tier: errors, configuration, request/result types, timing, metrics, tracing. Imports nothing else of
rag_service."""
