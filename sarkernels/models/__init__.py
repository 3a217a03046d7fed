"""Set-autoregressive models on the sarkernels ops."""
from .randar import RandARTransformer
from .rar import RARTransformer
from .sar import SARTransformer

# the model kinds checkpoints and training name
MODELS = {"sar": SARTransformer, "randar": RandARTransformer, "rar": RARTransformer}

__all__ = ["RandARTransformer", "RARTransformer", "SARTransformer", "MODELS"]
