"""HTTP layer: FastAPI app, routers, schemas, error mapping. Knows nothing of gradients."""

from camserve.api.app import create_app

__all__ = ["create_app"]
