"""proxjax: exact 2:4 proximal operator, N:M masks and optax transforms for pruning in JAX."""

from proxjax.nm import is_nm, nm_mask, project_nm
from proxjax.prox import prox_24, regularizer_24

__version__ = "0.1.0"

__all__ = [
    "is_nm",
    "nm_mask",
    "project_nm",
    "prox_24",
    "regularizer_24",
]
