"""Integrations with other libraries, each imported only by its user (``import moe_kernels`` imports
none of them): :mod:`moe_kernels.integrations.transformers` patches Hugging Face transformers MoE
models (extra ``[hf]``)."""
