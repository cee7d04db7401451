"""Whole-model work: block-by-block pruning (:func:`prune_model`) and pruning of any parameter pytree
(:func:`prune_params`), the dense layer statistics every layer-wise method minimizes (:func:`layer_statistics`),
perplexity (:mod:`proxjax.pipeline.evaluate`) and the memory/time planner
(:mod:`proxjax.pipeline.memory`)."""

from proxjax.pipeline.prune import (
    TRUE_SEQUENTIAL_STAGES,
    LayerReport,
    PipelineResult,
    layer_statistics,
    prune_model,
    prune_params,
    select_linears,
)

__all__ = ["LayerReport", "PipelineResult", "TRUE_SEQUENTIAL_STAGES", "layer_statistics", "prune_model", "prune_params", "select_linears"]
