"""Benchmarks: specc's generated models against hand-written PyTorch, and the compiler's own speed.

Run `python -m bench.run` (see README.md, "Benchmarks"). Not part of the installed package.
"""
