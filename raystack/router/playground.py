"""The playground: a page the router serves at /playground, for a person to see what `raystack bench` says in
numbers: one prompt sent at once to every backend of a model (`model@backend`), or to several models, the
answers streamed side by side, each with its time to first token, time per output token, tokens/s and tokens
as the browser measured them on the stream it received.

    GET /playground                   the page (playground/index.html)
    GET /playground/<asset>           its script and style sheet, nothing else

The page is static files shipped in the package (plain HTML, JS and CSS: no build step, nothing fetched from
another host at run time), read once at import. It needs no key and names no model: everything it shows comes
from the router's own /v1 endpoints, called by the page with the key the user typed (kept in the tab's
session storage only), so a visitor sees exactly what that key may use and a visitor without one sees nothing.

Its references are relative (its assets, and ../v1/ from its script), so it works under the router's
root_path. The Content-Security-Policy sent with each file lets the page load and call only its own origin,
run no inline script or style, and be framed by no other page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.exceptions import HTTPException

STATIC = Path(__file__).with_name("playground")
ASSET_TYPES = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}
PAGE = (STATIC / "index.html").read_bytes()
ASSETS = {name: (STATIC / name).read_bytes() for name in ASSET_TYPES}

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",  # the page's own script file: no inline script, no eval
    "style-src 'self'",
    "connect-src 'self'",  # the router's /v1 on this origin, nothing else
    "img-src 'self' data:",  # the page's empty data: favicon, so the browser asks for none
    "frame-ancestors 'none'",  # no other page frames it (and tricks a click on Send)
    "base-uri 'none'",
    "form-action 'none'",  # its forms are handled by the script, never submitted
    "object-src 'none'",
))
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # an upgraded router's page is picked up at the next load
}

routes = APIRouter(include_in_schema=False)  # a page, not part of the OpenAI API


@routes.get("/playground")
async def page() -> Response:
    return Response(PAGE, media_type="text/html; charset=utf-8", headers=HEADERS)


@routes.get("/playground/")
async def page_with_slash() -> Response:
    """To the page without the slash, relatively (the root_path is kept): its relative references are
    resolved from /playground."""
    return Response(status_code=307, headers={"Location": "../playground"})


@routes.get("/playground/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, f"The playground has no file {name!r}.")
    return Response(ASSETS[name], media_type=ASSET_TYPES[name], headers=HEADERS)
