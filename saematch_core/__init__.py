"""saematch: match sparse-autoencoder features across layers (SAE Match, ICLR 2025)."""

from saematch_core.errors import InfeasibleMatchError, SAEFormatError, SAEValidationError
from saematch_core.fold import fold, is_folded, rescale_features
from saematch_core.sae import SAE, Activation, ForwardOutput

__version__ = "0.1.0"

__all__ = [
    "SAE",
    "Activation",
    "ForwardOutput",
    "InfeasibleMatchError",
    "SAEFormatError",
    "SAEValidationError",
    "__version__",
    "fold",
    "is_folded",
    "rescale_features",
]
