"""Shared setup for the CPU unit tests."""

import torch

# The unit tests use tiny tensors: intra-op threading only adds overhead (and spin-wait contention on small,
# shared CI machines can make them 20x slower), so run torch single-threaded.
torch.set_num_threads(1)
