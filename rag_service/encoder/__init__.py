"""Text to vectors: the query and document encoders (torch, ONNX), micro-batching, ONNX export."""
