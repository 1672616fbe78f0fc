"""Options of the fxopt backend (API.md): validation, env overrides, defaults."""
from __future__ import annotations

import dataclasses
import os
import re

PATTERNS = ("attention", "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "lora", "lora_nf4",
            "linear_cross_entropy")
OPTION_KEYS = ("patterns", "disable", "memory_budget", "strict", "inductor", "cudagraphs", "offload")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclasses.dataclass(frozen=True)
class Config:
    patterns: frozenset = frozenset(PATTERNS)   # enabled patterns
    memory_budget: int | float | None = None    # bytes (int) or fraction of save-everything (float)
    strict: bool = False
    inductor: bool = True
    cudagraphs: bool = False                     # Inductor replays each compiled graph as a CUDA graph
    mode: str | None = None                      # torch.compile's mode, passed on to Inductor
    offload: bool = False                        # the memory planner may keep saved activations in host memory

    def enabled(self, name: str) -> bool:
        return name in self.patterns


def _pattern_list(key, value):
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(f"fxopt option {key!r} must be a list of pattern names from {list(PATTERNS)}, got {value!r}")
    bad = [v for v in value if v not in PATTERNS]
    if bad:
        raise ValueError(f"fxopt option {key!r}: unknown pattern(s) {bad}; valid names: {list(PATTERNS)}")
    return set(value)


def parse_budget(value):
    """None | int bytes | '12GiB' / '800MiB' | float fraction in (0, 1] -> None | int | float."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("fxopt option 'memory_budget' must be None, bytes (int > 0), a size like '12GiB', "
                         f"or a fraction in (0, 1]; got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"fxopt option 'memory_budget' in bytes must be > 0, got {value}")
        return value
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"fxopt option 'memory_budget' as a float is a fraction in (0, 1], got {value}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B)\s*", value.upper())
        if m:
            n = int(float(m.group(1)) * _UNITS[m.group(2)])
            if n > 0:
                return n
        raise ValueError(f"fxopt option 'memory_budget': cannot read {value!r}; use e.g. '12GiB', '800MiB', "
                         f"'2GB', an int of bytes or a fraction in (0, 1]")
    raise ValueError(f"fxopt option 'memory_budget' must be None, int, str or float, got {type(value).__name__}")


def _bool(key, value):
    if not isinstance(value, bool):
        raise ValueError(f"fxopt option {key!r} must be True or False, got {value!r}")
    return value


def _env_flag(environ, name: str, default: bool = False) -> bool:
    """An on/off environment variable: "0" is off, "1" is on, unset or "" is `default`, anything else an error."""
    value = environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return default if value == "" else value == "1"


def env_number(environ, name: str, default, ok, expect: str, kind=float):
    """A numeric environment variable: unset or "" is `default`; a value `kind` cannot read, or one `ok` rejects,
    raises ValueError("{name} must be {expect}, got ...")."""
    value = environ.get(name, "")
    if value == "":
        return default
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not ok(number):
        raise ValueError(f"{name} must be {expect}, got {value!r}")
    return number


def parse(options: dict | None = None, mode: str | None = None, environ=None) -> Config:
    """Validate the options dict of `torch.compile(..., backend="fxopt", options=...)`."""
    environ = os.environ if environ is None else environ   # read at call time (os.environ may be replaced)
    options = dict(options or {})
    unknown = [k for k in options if k not in OPTION_KEYS]
    if unknown:
        raise ValueError(f"unknown fxopt option(s) {unknown}; valid keys: {list(OPTION_KEYS)}")
    if mode not in (None,) + MODES:   # torch.compile's modes tune Inductor; fxopt passes them on
        raise ValueError(f"unknown torch.compile mode {mode!r} for fxopt; valid: {list(MODES)}")
    enabled = set(PATTERNS)
    if "patterns" in options and options["patterns"] is not None:
        enabled = _pattern_list("patterns", options["patterns"])
    disabled = _pattern_list("disable", options.get("disable") or [])
    env_disable = [s.strip() for s in environ.get("FXOPT_DISABLE", "").split(",") if s.strip()]
    if env_disable:
        bad = [s for s in env_disable if s not in PATTERNS]
        if bad:
            raise ValueError(f"FXOPT_DISABLE names unknown pattern(s) {bad}; valid names: {list(PATTERNS)}")
        disabled |= set(env_disable)
    env_strict, env_cg = _env_flag(environ, "FXOPT_STRICT"), _env_flag(environ, "FXOPT_CUDAGRAPHS")
    strict = _bool("strict", options.get("strict", False)) or env_strict
    inductor = _bool("inductor", options.get("inductor", True))
    # the env turns CUDA graphs on where Inductor compiles
    cudagraphs = _bool("cudagraphs", options.get("cudagraphs", False)) or (env_cg and inductor)
    if cudagraphs and not inductor:
        raise ValueError("fxopt option 'cudagraphs': True needs 'inductor': True (Inductor does the CUDA graph "
                         "capture); drop one of them")
    budget = parse_budget(options.get("memory_budget"))
    offload = _bool("offload", options.get("offload", False)) or _env_flag(environ, "FXOPT_OFFLOAD")
    if offload and budget is None:
        raise ValueError("fxopt option 'offload': True needs a 'memory_budget' (offloading is one of the planner's "
                         "moves to meet it); add one, e.g. 'memory_budget': '8GiB'")
    return Config(patterns=frozenset(enabled - disabled), memory_budget=budget,
                  strict=strict, inductor=inductor, cudagraphs=cudagraphs,
                  mode=None if mode == "default" else mode, offload=offload)
