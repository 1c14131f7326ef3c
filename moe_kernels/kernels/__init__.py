"""``@triton.jit`` kernels only, private to the package (imported lazily: they need Triton).

Nothing here imports from the layers above (``ops``, ``functional``, ...): a kernel module imports
Triton and, at most, the option enums of :mod:`moe_kernels.config`. Each kernel's launcher, its
``torch.library`` op and its ahead-of-time compile cases live in ``moe_kernels/ops/<family>.py``.
"""
