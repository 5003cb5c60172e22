from .config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "train"]
