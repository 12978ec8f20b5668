"""The router that serves the page, and the page's controls against EditParams."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.api.errors import install_error_handlers
from services.api.routes import ui
from services.common.edit_params import EditForm, OutputFormat


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(ui.router)
    return TestClient(app)


def test_root_redirects_to_the_page(client):
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/ui"


@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/ui", "text/html"),
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ],
)
def test_serves_the_files(client, path, media_type):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    assert response.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize("name", ["index.html", "nope.js", "..%2Froutes%2Fui.py", "%2e%2e"])
def test_nothing_else_is_served(client, name):
    response = client.get(f"/ui/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] in ("not_found", "http_404")


def test_not_in_the_openapi_schema(client):
    paths = client.get("/openapi.json").json().get("paths", {})
    assert not [path for path in paths if path == "/" or path.startswith("/ui")]


class _Inputs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.by_name: dict[str, dict[str, str]] = {}
        self.options: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        if "name" in attrs and tag in ("input", "select", "textarea"):
            self.by_name[attrs["name"]] = {"tag": tag, **attrs}
        if tag == "option":
            self.options.append(attrs["value"])
        for ref in ("src", "href"):
            if attrs.get(ref, "").startswith(("http:", "https:", "//")):
                self.external.append(attrs[ref])


def _limits(name: str) -> dict[str, float]:
    limits = {}
    for item in EditForm.model_fields[name].metadata:
        for bound in ("ge", "le"):
            if getattr(item, bound, None) is not None:
                limits[bound] = getattr(item, bound)
    return limits


def test_controls_match_the_form_fields():
    page = _Inputs()
    page.feed((ui.STATIC_DIR / "index.html").read_text())
    numeric = [
        "image_guidance_scale",
        "guidance_scale",
        "num_inference_steps",
        "seed",
        "num_outputs",
    ]
    for name in numeric:
        attrs, field = page.by_name[name], EditForm.model_fields[name]
        assert name in EditForm.model_fields
        assert float(attrs["min"]) == _limits(name)["ge"], name
        assert float(attrs["max"]) == _limits(name)["le"], name
        if field.default_factory is None:
            assert float(attrs["value"]) == field.default, name
    assert page.by_name["prompt"]["maxlength"] == "500"
    assert page.options == [fmt.value for fmt in OutputFormat]
    for name in page.by_name:
        assert name in EditForm.model_fields or name in ("image", "mask"), name
    assert not page.external


def test_page_has_the_stable_test_ids():
    html = (ui.STATIC_DIR / "index.html").read_text()
    for testid in (
        "image-input",
        "mask-input",
        "prompt",
        "image-guidance",
        "text-guidance",
        "steps",
        "seed",
        "submit",
        "progress",
        "cancel",
        "result-image",
        "download",
        "edit-again",
        "grid",
        "error",
        "api-key",
        "seed-random",
        "outputs",
        "format",
        "history",
        "chain",
        "grid-button",
    ):
        assert f'data-testid="{testid}"' in html, testid
    # grid-cell is made per cell by the script.
    assert '"grid-cell"' in (ui.STATIC_DIR / "app.js").read_text()


def test_the_api_app_serves_the_page():
    from services.api.main import create_app
    from services.common.settings import Settings

    app = create_app(Settings())
    client = TestClient(app)  # no lifespan: the page needs neither Redis nor the queue
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui"
    assert client.get("/ui").text.startswith("<!doctype html>")
    assert client.get("/ui/app.js").status_code == 200
    missing = client.get("/ui/missing.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert not [path for path in app.openapi()["paths"] if path == "/" or path.startswith("/ui")]
