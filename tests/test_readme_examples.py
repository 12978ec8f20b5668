"""What the README shows is what the code does: its sample files exist and are the ones
the script draws, and its dataset example's run id is the id of that request."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from services.common.api_keys import LOCAL_KEY_ID
from services.common.datasets import DatasetSpec
from services.common.images import check_image_upload

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_sample_the_readme_uploads_ships():
    uploads = set(re.findall(r"=@([\w./-]+)", README))
    assert uploads >= {"samples/hoodie.jpg", "samples/hoodie-background.png"}
    for path in uploads:
        assert (ROOT / path).is_file(), path
    photo = check_image_upload((ROOT / "samples/hoodie.jpg").read_bytes())
    assert photo.content_type == "image/jpeg"


def test_samples_are_what_the_script_draws(tmp_path):
    script = ROOT / "scripts/make_sample_photo.py"
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, capture_output=True)
    for name in ("hoodie.jpg", "hoodie-background.png"):
        assert (tmp_path / name).read_bytes() == (ROOT / "samples" / name).read_bytes(), name


def test_the_dataset_example_shows_the_id_of_its_request():
    block = README[README.index("### Building product edit datasets") :]
    body = json.loads(re.search(r"-d '(\{.*?\})'", block).group(1))
    shown = re.search(r'# \{"id":"([0-9a-f]+)"', block).group(1)
    assert DatasetSpec(**body).run_id(LOCAL_KEY_ID) == shown
    assert f"/v1/datasets/{shown}" in block
