"""Model loading and the model implementations (Llama family, dense and MoE).

``load_model(path, dtype, device) -> (model, ModelInfo)`` is the engine's entry point.
"""

from shoal.runtime.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelLoadError
from shoal.runtime.models.loader import ModelInfo, load_model

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelConfig",
    "ModelInfo",
    "ModelLoadError",
    "load_model",
]
