"""Loaded at start-up by the Python processes of `scripts/test.sh` (it puts this folder on PYTHONPATH), never by a
user's fervit: lets the tests import the CUDA-built torchvision from PyPI beside the CPU torch.

PyPI's Linux torchvision wheels are built against CUDA torch. Beside the CPU torch their C++ ops do not load, and
`import torchvision` then fails while registering fake kernels for two of them (`operator torchvision::nms does
not exist`). The code the tests reach (timm's models, torchvision's transforms for the bench) never calls those ops,
so declaring them before torchvision is first imported suffices; `fervit.benchmark.pipelines` does the same for a
user's bench. test.sh keeps that torchvision, kornia and timm in a folder of their own (FERVIT_TEST_EXTRAS), not in
the environment's site-packages, so the environment itself never holds a package that cannot be imported.
"""

import importlib.abc
import sys


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    """On the first `import torchvision`: declare its two C++ ops that cannot load, then step aside."""

    done = False

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision" or self.done:
            return None
        self.done = True  # (not removed from sys.meta_path: the import system is iterating over it)
        import torch

        global _library
        _library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            try:
                _library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:  # a torchvision built for this torch declared it already
                pass
        return None  # the normal finders import torchvision itself


sys.meta_path.insert(0, _DeclareTorchvisionOps())
