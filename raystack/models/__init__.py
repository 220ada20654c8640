"""Model sources (embedded, local, ModelScope, Hugging Face) and the on-disk model cache."""
