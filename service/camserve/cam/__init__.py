"""Pure-PyTorch class activation map engine (no HTTP): methods, layers, rendering."""

from camserve.cam.engine import CamEngine, Explanation
from camserve.cam.errors import CamError, InvalidTargetError, UnknownLayerError, UnknownMethodError
from camserve.cam.methods import METHOD_NAMES, get_method
from camserve.cam.render import COLORMAPS

__all__ = [
    "COLORMAPS",
    "METHOD_NAMES",
    "CamEngine",
    "CamError",
    "Explanation",
    "InvalidTargetError",
    "UnknownLayerError",
    "UnknownMethodError",
    "get_method",
]
