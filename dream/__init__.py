"""dream: DREAM (arXiv 2603.02667) - one model for CLIP-style visual understanding and
masked-autoregressive text-to-image generation - plus alignment methods.

    import dream
    model = dream.create_model("dream_b")
"""
from .models import DREAM as DREAM
from .models import DreamConfig as DreamConfig
from .models import create_model as create_model
from .models import get_config as get_config
from .models import list_models as list_models
from .models import save_pretrained as save_pretrained
from .version import __version__ as __version__


def __getattr__(name):  # lazy: the pipeline pulls in tokenizers and text encoders
    if name == "DreamPipeline":
        from .pipeline import DreamPipeline

        return DreamPipeline
    raise AttributeError(f"module 'dream' has no attribute {name!r}")
