"""Model loading and compute: GGUF files, shards, stages (MLX or ggml), sampling."""
