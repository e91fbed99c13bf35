"""Pure-PyTorch class activation map engine (no HTTP): methods, layers, rendering."""

from service.cam.engine import CamEngine, Explanation
from service.cam.errors import CamError, InvalidTargetError, UnknownLayerError, UnknownMethodError
from service.cam.methods import METHOD_NAMES, get_method
from service.cam.render import COLORMAPS

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
