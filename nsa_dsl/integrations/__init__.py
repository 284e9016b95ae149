"""nsa-dsl inside other libraries (transformers, torch.distributed)."""
