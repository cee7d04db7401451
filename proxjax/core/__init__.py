"""Building blocks: the exact 2:4 prox, N:M masks, sparsity specs, optax transforms, sharding declarations, the
progress meter and atomic file writes. Imports nothing else of proxjax."""
