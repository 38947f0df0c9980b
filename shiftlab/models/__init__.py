"""Models by name or factory, their weights (torchvision API, checkpoint files), BlurPool
antialiasing and circular padding."""
from .zoo import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
