"""DREAM model classes, configs and the registry."""
from .config import DreamConfig as DreamConfig
from .convert import load_checkpoint_into as load_checkpoint_into
from .convert import save_pretrained as save_pretrained
from .dream import DREAM as DREAM
from .patchify import patchify as patchify
from .patchify import unpatchify as unpatchify
from .registry import create_model as create_model
from .registry import get_config as get_config
from .registry import list_models as list_models
from .registry import register_model as register_model
from .autoencoder import AutoencoderKL as AutoencoderKL
from .tokenizers import PixelTokenizer as PixelTokenizer
from .autoencoder import VAEConfig as VAEConfig
from .tokenizers import VAETokenizer as VAETokenizer
from .tokenizers import create_tokenizer as create_tokenizer
