"""Export for other engines: `export_vllm` (a checkpoint stock vLLM serves) and `export_gguf` (llama.cpp's deci)."""
