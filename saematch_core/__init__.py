"""saematch: match sparse-autoencoder features across layers (SAE Match, ICLR 2025).

The public API of the library: containers, formats, the cache and the matching math (the first two
floors of ``docs/ARCHITECTURE.md``). The substrate (``saematch_core.profiles``, ``.prepare``, ...)
and the study of the paper (``saematch_core.experiments``) are imported from their modules; they
load language models and are not needed to match two SAEs.

>>> import torch, saematch_core as sm
>>> a = sm.SAE(W_enc=torch.eye(3), b_enc=torch.zeros(3), W_dec=torch.eye(3), b_dec=torch.zeros(3),
...            threshold=torch.tensor([0.5, 1.0, 2.0]))
>>> sm.match(a, a.permute(torch.tensor([2, 0, 1]))).perm.tolist()
[1, 2, 0]
"""

from saematch_core.cache import cache_root, content_key
from saematch_core.compose import FeaturePath, agreement, compose, compose_chain, invert, path
from saematch_core.cost import cost_matrix, feature_vectors, iter_cost_chunks, pair_costs
from saematch_core.errors import InfeasibleMatchError, SAEFormatError, SAEValidationError
from saematch_core.fold import fold, is_folded, rescale_features
from saematch_core.formats import (
    FORMATS,
    GEMMA_SCOPE_2B_RES_16K_L0,
    GEMMA_SCOPE_2B_RES_REPO,
    detect_format,
    gemma_scope_path,
    load_sae,
    save_sae,
)
from saematch_core.lap import linear_sum_assignment
from saematch_core.match import MatchConfig, MatchResult, match
from saematch_core.sae import SAE, Activation, ForwardOutput

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "GEMMA_SCOPE_2B_RES_16K_L0",
    "GEMMA_SCOPE_2B_RES_REPO",
    "SAE",
    "Activation",
    "FeaturePath",
    "ForwardOutput",
    "InfeasibleMatchError",
    "MatchConfig",
    "MatchResult",
    "SAEFormatError",
    "SAEValidationError",
    "__version__",
    "agreement",
    "cache_root",
    "compose",
    "compose_chain",
    "content_key",
    "cost_matrix",
    "detect_format",
    "feature_vectors",
    "fold",
    "gemma_scope_path",
    "invert",
    "is_folded",
    "iter_cost_chunks",
    "linear_sum_assignment",
    "load_sae",
    "match",
    "pair_costs",
    "path",
    "rescale_features",
    "save_sae",
]
