"""camserve: image classification with class activation map explanations, served over HTTP."""

__version__ = "0.1.0"
