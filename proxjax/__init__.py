"""proxjax: exact 2:4 proximal operator, N:M masks and optax transforms for pruning in JAX."""

from proxjax.nm import is_nm, nm_mask, project_nm
from proxjax.prox import prox_24, regularizer_24
from proxjax.spec import default_spec, resolve_spec
from proxjax.transforms import masked_updates, project_nm_update, prox_24_update

__version__ = "0.1.0"

__all__ = [
    "default_spec",
    "is_nm",
    "masked_updates",
    "nm_mask",
    "project_nm",
    "project_nm_update",
    "prox_24",
    "prox_24_update",
    "regularizer_24",
    "resolve_spec",
]
