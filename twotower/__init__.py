from .checkpoints import load_backbone
