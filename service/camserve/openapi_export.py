"""Write the app's OpenAPI document: `python -m camserve.openapi_export openapi/openapi.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from camserve.api import create_app
from camserve.settings import Settings


def openapi_text() -> str:
    """The OpenAPI document as committed: stable key order, two-space indent, trailing newline."""
    return json.dumps(create_app(Settings()).openapi(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0] if args else "openapi/openapi.json")
    target.write_text(openapi_text(), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
