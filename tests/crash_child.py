"""`etl` with an HTTP library that fails in a way nobody planned for.

Its error quotes the request URL, which carries the token, as a bug in a
dependency might. tests/test_delivery.py runs this as a subprocess and greps
everything it prints (a traceback included) for the token.
"""

from __future__ import annotations

from typing import Any

import httpx

from etl.cli import main


def _broken_send(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
    raise RuntimeError(f"unexpected failure while talking to {request.url}")


httpx.Client.send = _broken_send  # type: ignore[method-assign]
main()
