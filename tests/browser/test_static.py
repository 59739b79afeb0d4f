"""How the edge serves the chat page's files (no browser needed): only the page's own scripts and style sheet,
revalidated on every load, and the page under a Content-Security-Policy without inline script."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from tests.conftest import run_system

pytestmark = pytest.mark.integration

STATIC = Path(__file__).resolve().parents[2] / "edge" / "static"


async def test_the_page_and_its_files_are_served_with_safe_headers(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_, aiohttp.ClientSession() as s:
        async with s.get(f"{sys_.http}/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            page = await r.text()
            csp = r.headers["Content-Security-Policy"]
            host = sys_.http.removeprefix("http://")
            assert "script-src 'self';" in csp and "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
            assert f"connect-src 'self' ws://{host} wss://{host};" in csp
            assert r.headers["Cache-Control"] == "no-cache" and r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["Referrer-Policy"] == "no-referrer"
        assert "<script>" not in page and " style=" not in page  # nothing inline: the CSP would block it
        refs = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
        assert sorted(refs) == ["/static/app.css", "/static/app.js", "/static/markdown.js"]
        for ref in refs:
            async with s.get(sys_.http + ref) as r:
                assert r.status == 200, ref
                assert r.content_type == ("text/css" if ref.endswith(".css") else "text/javascript"), r.content_type
                assert r.headers["Cache-Control"] == "no-cache" and r.headers["X-Content-Type-Options"] == "nosniff"
                assert await r.read() == (STATIC / ref.rsplit("/", 1)[1]).read_bytes()
                etag = r.headers["ETag"]
            async with s.get(sys_.http + ref, headers={"If-None-Match": etag}) as r:
                assert r.status == 304  # revalidated, not downloaded again
        for bad in ("/static/index.html", "/static/nope.js", "/static/..%2fapi.py", "/static/", "/static/%2e%2e"):
            async with s.get(URL(sys_.http + bad, encoded=True)) as r:  # sent as written
                assert r.status == 404, bad
                assert r.content_type == "application/json"
        async with s.get(f"{sys_.http}/", headers={"Host": 'evil"; script-src *'}) as r:  # not echoed into the CSP
            assert r.status == 200 and "evil" not in r.headers["Content-Security-Policy"]
