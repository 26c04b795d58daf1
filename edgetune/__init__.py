"""edgetune: federated, on-device fine-tuning of small Llama models."""

import logging

# Import-time chatter of optional dependencies is not the user's business (a quiet console):
# torchao's prebuilt CUDA kernels fail to load on a CPU-only torch, and torch notes a deprecated
# registration that torchao makes. Both are warnings about code paths edgetune never takes.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
