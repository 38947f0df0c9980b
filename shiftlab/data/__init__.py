"""Images: the shipped sample photographs, folders, class folders and CSV labels, streamed."""
from .images import ImagePreprocess, UnreadableImageError, load_images, sample_image_paths

__all__ = ["ImagePreprocess", "UnreadableImageError", "load_images", "sample_image_paths"]
