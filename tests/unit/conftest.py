import torch

# Unit tests use tiny tensors, where OpenMP thread start-up and contention on a shared machine
# cost far more than they save.
torch.set_num_threads(1)
