//! The training providers: OpenAI (and the simulated upstream), Azure OpenAI, Kubernetes LoRA + vLLM.
