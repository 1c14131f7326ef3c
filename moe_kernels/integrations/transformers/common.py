"""What the HF integration's modules share: the transformers version check and the attribute
names a patch leaves in a module's ``__dict__``."""

from __future__ import annotations

import re

# 5.13 is the first release whose six supported families all have fused experts and a router
# module that computes the routing (5.0-5.12: DeepSeek-V3 routes in its MoE block, and 5.0 masks
# dropped groups with 0.0 where 5.12 uses -inf); the routers and experts of 5.13 match 5.23's
# up to expert-parallel plumbing (checked by diffing the classes of 5.0, 5.12, 5.13, 5.15, 5.18;
# tests/test_hf_integration.py passes under 5.13.0 too).
MIN_TRANSFORMERS_VERSION = "5.13"
EXPERTS_IMPLEMENTATION = "moe_kernels"

# Per patched module, in its __dict__: which attribute was replaced and what it held before
# (None: nothing, the class's forward showed through), the backend its forward runs, and (routers)
# the RoutingConfig it routes with.
SAVED = "_moe_kernels_saved_forward"
BACKEND = "_moe_kernels_backend"
ROUTING = "_moe_kernels_routing"
# Per patched experts module whose weights the patch re-laid (see patch.pack_expert_weights): the
# names of those Parameters.
PACKED = "_moe_kernels_packed"
# Per experts module that ran the patched forward: the fused_experts activation found for it.
ACTIVATION = "_moe_kernels_activation"


# ---------------------------------------------------------------------------------------------
# transformers version


def require_transformers():
    """Import transformers, or raise an ImportError naming the version needed."""
    need = f"transformers>={MIN_TRANSFORMERS_VERSION}"
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            f"moe_kernels.integrations.transformers needs {need}: pip install 'moe-kernels[hf]'"
        ) from error
    version = getattr(transformers, "__version__", "0")
    match = re.match(r"(\d+)\.(\d+)", version)
    found = tuple(int(part) for part in match.groups()) if match else (0, 0)
    if found < tuple(int(part) for part in MIN_TRANSFORMERS_VERSION.split(".")):
        raise ImportError(layout_message(f"found transformers {version}"))
    return transformers


def layout_message(found: str) -> str:
    return (
        f"moe_kernels.integrations.transformers needs transformers>={MIN_TRANSFORMERS_VERSION}, whose MoE experts "
        f"are fused modules (gate_up_proj (E, 2I, H) / down_proj (E, H, I) parameters) routed by a router module "
        f"(DeepSeek-V3's DeepseekV3TopkRouter computes the routing since 5.13); {found}. "
        f"Upgrade with: pip install 'transformers>={MIN_TRANSFORMERS_VERSION}'"
    )
