"""aiayn: the Transformer of "Attention Is All You Need" (Vaswani et al., 2017), from scratch."""

from aiayn.config import TransformerConfig
from aiayn.model import Transformer

__version__ = "0.1.0"
__all__ = ["Transformer", "TransformerConfig", "__version__"]
