"""Model loading and architecture adapters."""
from .loading import BUNDLED, LoadedModel, ModelLoadError, load_model
