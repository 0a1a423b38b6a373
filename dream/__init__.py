"""dream: DREAM (arXiv 2603.02667) - one model for CLIP-style visual understanding and
masked-autoregressive text-to-image generation - plus alignment methods.

    import dream
    model = dream.create_model("dream_b")
"""
import importlib.abc as _abc
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path


class _SourceTreeKernels(_abc.MetaPathFinder):
    """From a source checkout used without installing (``PYTHONPATH=.``), ``dream.kernels`` is the top-level
    ``kernels/`` folder, as the installed package maps it (setup.py ``package_dir``). Resolved lazily."""

    root = _Path(__file__).resolve().parent.parent / "kernels"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "dream.kernels" or not (self.root / "__init__.py").is_file():
            return None
        return _util.spec_from_file_location(fullname, self.root / "__init__.py",
                                             submodule_search_locations=[str(self.root)])


if _util.find_spec(".kernels", __name__) is None and not any(isinstance(f, _SourceTreeKernels) for f in _sys.meta_path):
    _sys.meta_path.append(_SourceTreeKernels())

from .models import DREAM as DREAM  # noqa: E402
from .models import DreamConfig as DreamConfig  # noqa: E402
from .models import create_model as create_model  # noqa: E402
from .models import get_config as get_config  # noqa: E402
from .models import list_models as list_models  # noqa: E402
from .models import save_pretrained as save_pretrained  # noqa: E402
from .version import __version__ as __version__  # noqa: E402


def __getattr__(name):  # lazy: the pipeline pulls in tokenizers and text encoders
    if name == "DreamPipeline":
        from .pipeline import DreamPipeline

        return DreamPipeline
    raise AttributeError(f"module 'dream' has no attribute {name!r}")
