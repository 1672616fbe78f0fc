"""Pattern passes, in the order the pipeline runs them (each: candidates, guard with a reason, replacement)."""
from fxopt.patterns.attention import ATTENTION
from fxopt.patterns.rms_norm import RMS_NORM
from fxopt.patterns.layer_norm import LAYER_NORM
from fxopt.patterns.rope import ROPE
from fxopt.patterns.gated_mlp import GEGLU, SWIGLU
from fxopt.patterns.linear_cross_entropy import LINEAR_CROSS_ENTROPY
from fxopt.patterns.lora import LORA, LORA_NF4

PATTERNS = [ATTENTION, RMS_NORM, LAYER_NORM, ROPE, SWIGLU, GEGLU, LORA, LORA_NF4, LINEAR_CROSS_ENTROPY]
