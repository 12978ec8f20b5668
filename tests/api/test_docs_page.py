"""/docs works offline: Swagger UI's page names no other host, and its assets are served."""

import re

from fastapi.testclient import TestClient

from services.api.main import create_app


def test_docs_load_nothing_from_other_hosts(settings):
    with TestClient(create_app(settings)) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        assert "swagger-ui" in page.text
        urls = re.findall(r'(?:href|src|url)\s*[:=]\s*[\'"]([^\'"]+)[\'"]', page.text)
        assert urls and not [u for u in urls if re.match(r"(https?:)?//", u)], urls
        for url in urls:
            assert client.get(url).status_code == 200, url
        # The schema it renders, and no ReDoc page that would need a CDN.
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/redoc").status_code == 404
