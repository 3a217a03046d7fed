"""Set-autoregressive models on the sarkernels ops."""
from .randar import RandARTransformer
from .rar import RARTransformer
from .sar import SARTransformer

__all__ = ["RandARTransformer", "RARTransformer", "SARTransformer"]
