"""Make `import torchvision` work when its compiled ops cannot load.

torchvision's wheel may be a CUDA build whose C++ ops cannot load next to a CPU build of
torch; its import then fails registering meta kernels for `torchvision::nms` and
`torchvision::qnms` ("operator torchvision::nms does not exist"). open_clip and
transformers' CLIP import torchvision, so when (and only when) that happens we define the
two op schemas ourselves and import again. Nothing we run calls those ops.
"""

import sys

_SCHEMAS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def ensure_torchvision() -> None:
    """Import torchvision, defining its missing op schemas first if its C++ ops fail to load."""
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "transforms"):
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:
        if "does not exist" not in str(error):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import torch

        for op, schema in _SCHEMAS.items():
            if not torch._C._jit_get_schemas_for_operator(op):
                torch.library.define(op, schema)
        import torchvision  # noqa: F401
