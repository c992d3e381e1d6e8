"""hgkd: H-GKD, heterogeneous generative knowledge distillation with masked image modeling.

Subpackages (one job each, data flows one way): ``hgkd.extract`` -> ``hgkd.storage`` ->
``hgkd.distill`` -> ``hgkd.evaluate``; ``hgkd.pipelines`` composes them.
"""
from .errors import HgkdError
from .version import __version__

__all__ = ["HgkdError", "__version__"]
