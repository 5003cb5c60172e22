from .checkpoints import load_backbone

__all__ = ["load_backbone"]
