"""Training: one loop, one loss, one resume format (:mod:`proxjax.training.loop`); recovery fine-tuning, ProxSparse
(learned 2:4 masks) and ProSparse (activation sparsity) are what differs."""
