"""``@triton.jit`` kernels only, private to the package (imported lazily: they need Triton).

``registry.py`` lists every kernel with the constexpr configurations its launchers can choose,
for the ahead-of-time compile check (``moe_kernels.aot``).
"""
