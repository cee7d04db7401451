"""Workflows: what each ``proxjax`` command does, as a plain Python function that writes the checkpoint, the report
and the provenance (prune, evaluate, fine-tune, learn masks, activation sparsity)."""
