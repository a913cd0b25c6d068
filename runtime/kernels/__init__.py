"""Triton kernels for GPUs, each with a torch reference it is tested against.

Importing this package does not import Triton; each kernel module does, and Triton decides
at import time whether its kernels run compiled (a GPU) or under ``TRITON_INTERPRET=1``.
"""
