"""One file per op: Triton kernels, launcher, PyTorch reference, torch.library registration, cost."""
from fxopt.kernels import rms_norm  # noqa: F401  (registers torch.ops.fxopt.rms_norm*)
from fxopt.kernels import layer_norm  # noqa: F401  (registers torch.ops.fxopt.layer_norm*)
from fxopt.kernels import gated_mlp  # noqa: F401  (registers torch.ops.fxopt.gated_mlp*)
from fxopt.kernels import rope  # noqa: F401  (registers torch.ops.fxopt.rope*)
from fxopt.kernels import lora  # noqa: F401  (registers torch.ops.fxopt.lora*, lora_nf4*; nf4.py holds the GEMM)
from fxopt.kernels import linear_cross_entropy  # noqa: F401  (registers torch.ops.fxopt.linear_cross_entropy)
from fxopt.kernels import attention  # noqa: F401  (registers torch.ops.fxopt.attention, attention_backward)
from fxopt.kernels import offload  # noqa: F401  (registers torch.ops.fxopt.offload, reload)
