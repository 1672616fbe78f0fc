"""fxopt: a torch.compile backend that rewrites LLM fine-tuning graphs onto fused Triton kernels.

    torch.compile(model, backend="fxopt", options={...});  fxopt.last_report()
"""
import logging

import fxopt.kernels  # noqa: F401  (registers torch.ops.fxopt.*)
from fxopt.config import PATTERNS, Config
from fxopt.dynamo_backend import backend
from fxopt.errors import FxoptError
from fxopt.report import last_report

__version__ = "0.1.0"
__all__ = ["backend", "last_report", "PATTERNS", "Config", "FxoptError", "__version__"]


def _register_logs():
    # TORCH_LOGS="+fxopt" turns on the `fxopt` logger tree (private torch API: feature-detected).
    try:
        from torch._logging._internal import log_registry, register_log
        if "fxopt" not in getattr(log_registry, "log_alias_to_log_qnames", {}):
            register_log("fxopt", "fxopt")
            import torch._logging._internal as _li
            _li._init_logs()
    except Exception:  # noqa: BLE001
        logging.getLogger("fxopt").debug("TORCH_LOGS registration unavailable")


_register_logs()
