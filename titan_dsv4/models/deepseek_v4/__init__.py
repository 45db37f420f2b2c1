"""DeepSeek-V4 (Flash / Pro) with Multi-Token Prediction."""

from .args import DeepseekV4ModelArgs
from .flavors import FLAVORS
from .model import DeepseekV4Model

__all__ = ["DeepseekV4ModelArgs", "DeepseekV4Model", "FLAVORS"]
