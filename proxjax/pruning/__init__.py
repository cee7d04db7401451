"""Layer pruning: Hessians from calibration inputs, the baselines, refinement, typed method configurations and
:func:`proxjax.prune_kernel`. Builds on :mod:`proxjax.core` only."""
