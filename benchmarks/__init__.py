"""Benchmarks of lsr-kernels against the reference, torch.compile, open_clip and Inf-CL.

Run ``python -m benchmarks --help``; the method and the commands are in ``benchmarks/NOTES.md``.
"""
