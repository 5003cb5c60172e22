from .load import DEFAULT_MODEL, REGISTRY, CheckpointError, checkpoint_dir, load_backbone

__all__ = ["DEFAULT_MODEL", "REGISTRY", "CheckpointError", "checkpoint_dir", "load_backbone"]
