"""Set-autoregressive models on the sarkernels ops."""
from .condition import Prompt
from .randar import RandARTransformer
from .rar import RARTransformer
from .sar import SARTransformer

# the model kinds checkpoints and training name
MODELS = {"sar": SARTransformer, "randar": RandARTransformer, "rar": RARTransformer}

__all__ = ["Prompt", "RandARTransformer", "RARTransformer", "SARTransformer", "MODELS"]
