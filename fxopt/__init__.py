"""fxopt: a torch.compile backend that rewrites LLM fine-tuning graphs onto fused Triton kernels.

    torch.compile(model, backend="fxopt", options={...});  fxopt.last_report()
"""
import fxopt.kernels  # noqa: F401  (registers torch.ops.fxopt.*)
from fxopt.config import PATTERNS, Config
from fxopt.dynamo_backend import backend
from fxopt.errors import FxoptError
from fxopt.report import last_report

__version__ = "0.1.0"
# Logging: loggers live under "fxopt"; TORCH_LOGS="+fxopt" works as for any module name.
__all__ = ["backend", "last_report", "PATTERNS", "Config", "FxoptError", "__version__"]
