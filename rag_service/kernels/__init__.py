"""Compute kernels: the native facade (C++/CUDA, picked at import) and their NumPy references."""
