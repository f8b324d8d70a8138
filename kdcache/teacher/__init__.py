"""Teacher backends that fill a cache (transformers; vLLM), and the sparsifiers that decide what is kept."""
