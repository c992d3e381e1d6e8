"""hgkd: H-GKD, heterogeneous generative knowledge distillation with masked image modeling.

Subpackages (one job each, data flows one way): ``hgkd.extract`` -> ``hgkd.storage`` ->
``hgkd.distill`` -> ``hgkd.evaluate``; ``hgkd.pipelines`` composes them.
"""
# Absolute imports: the repository root is this package, and test runners may import this
# file under the checkout's directory name.
from hgkd.errors import HgkdError
from hgkd.version import __version__

__all__ = ["HgkdError", "__version__"]
