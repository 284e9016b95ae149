"""The compiled op, its torch.library kernels, the KV cache and the nn.Module."""
