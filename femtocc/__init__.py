"""femtocc: a sparse compiler stack that puts Whisper on the spu001 sparse processing unit."""

from femtocc.errors import FemtoccError

__version__ = "0.1.0"
__all__ = ["FemtoccError", "__version__"]
