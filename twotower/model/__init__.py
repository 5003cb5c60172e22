from .backbone import Backbone
from .cache import ModelCache
from .config import BackboneConfig, MambaConfig, MoEConfig, RopeConfig

__all__ = ["Backbone", "BackboneConfig", "MambaConfig", "MoEConfig", "ModelCache", "RopeConfig"]
