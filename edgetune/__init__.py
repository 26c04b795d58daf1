"""edgetune: federated, on-device fine-tuning of small Llama models."""

import logging
import warnings

# Chatter of optional dependencies about code paths edgetune never chooses is not the user's
# business (a quiet console): torchao's prebuilt CUDA kernels fail to load on a CPU-only torch,
# torch notes a deprecated registration that torchao makes, and torch.export copies pytree
# specs through a class torch itself deprecated (dozens of lines per `edgetune export`).
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
