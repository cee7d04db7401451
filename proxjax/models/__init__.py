"""LLaMA-family models in Flax NNX (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3, Qwen3-MoE, Mixtral),
their Hugging Face / orbax checkpoint I/O, the GGUF converter (:mod:`proxjax.models.convert`) and greedy generation
with a KV cache (:mod:`proxjax.models.generate`). Names are imported on first use.

``linear_names`` / ``expert_names`` (a config's prunable linears, its stacked expert kernels) and ``hf_to_slot`` /
``hf_names`` (Hugging Face tensor names of a mixture of experts' stacked kernels, one per expert) are public because
the pipeline, the memory planner and ``proxjax check`` name every family's linears through them."""

from proxjax.core.lazy import lazy_exports

_EXPORTS = {
    "proxjax.models.generate": ["KVCache", "greedy_generate", "truncate_prompts"],
    "proxjax.models.hf": ["check_sparsity", "hf_names", "hf_to_path", "hf_to_slot", "load_pretrained", "path_to_hf",
                          "restore_state", "save_pretrained", "save_state"],
    "proxjax.models.llama": ["LINEAR_NAMES", "SUPPORTED_ARCHITECTURES", "CheckpointError", "LlamaAttention",
                             "LlamaConfig", "LlamaDecoderLayer", "LlamaForCausalLM", "LlamaMLP", "LlamaModel",
                             "LlamaRMSNorm", "UnsupportedModelError", "apply_rope", "dtype_from_name",
                             "expert_names", "linear_names", "rope_inv_freq"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
