"""The reference semantics in plain PyTorch, and the call checks the op shares."""
