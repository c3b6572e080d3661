"""aiayn: the Transformer of "Attention Is All You Need" (Vaswani et al., 2017), from scratch."""

__version__ = "0.1.0"
