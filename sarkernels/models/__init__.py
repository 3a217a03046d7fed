"""Set-autoregressive models on the sarkernels ops."""
from .condition import Prompt
from .decoder_only import DecoderOnlyConfig
from .randar import RandARTransformer
from .rar import RARConfig, RARTransformer
from .rar_official import OfficialRAR, OfficialRARConfig
from .sar import SARConfig, SARTransformer

# the model kinds checkpoints and training name
MODELS = {"sar": SARTransformer, "randar": RandARTransformer, "rar": RARTransformer,
          "rar-official": OfficialRAR}

__all__ = ["Prompt", "RandARTransformer", "RARTransformer", "SARTransformer", "MODELS",
           "SARConfig", "DecoderOnlyConfig", "RARConfig", "OfficialRAR", "OfficialRARConfig"]
