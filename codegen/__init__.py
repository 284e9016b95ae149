"""Code generation: IR -> kernel plan -> rendered Triton source -> cached, loaded modules."""
