from .configuration_dream import DreamConfig
from .modeling_dream import DreamBaseModel, DreamDecoderLayer, DreamModel, DreamPreTrainedModel

__all__ = ["DreamConfig", "DreamBaseModel", "DreamDecoderLayer", "DreamModel", "DreamPreTrainedModel"]
