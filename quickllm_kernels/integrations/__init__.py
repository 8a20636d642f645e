"""Integrations with other libraries, one submodule each; importing this package imports none of them,
and each submodule imports its library only when used.

    quickllm_kernels.integrations.hf    quickllm ops inside one transformers model instance (apply / revert)
    quickllm_kernels.integrations.trl   TRL's GRPOTrainer computing its log-probs and loss on the fused path
    quickllm_kernels.integrations.vllm  vLLM plugin (entry point vllm.general_plugins): RoPE, RMSNorm, MoE, MLA decode
    quickllm_kernels.integrations.trtllm_models  TensorRT-LLM's PyTorch backend: Qwen2, Mixtral, DeepSeek-V3 on quickllm ops
    quickllm_kernels.integrations.trtllm  TensorRT-LLM checkpoints for trtllm-build (export, read back)
    quickllm_kernels.integrations.auto_deploy  TensorRT-LLM AutoDeploy: graph transforms onto quickllm ops
"""
