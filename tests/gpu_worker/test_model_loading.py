import pytest

from services.gpu_worker.model_loading import ModelUnavailable, resolve_model


def test_local_directory_resolves(tiny_model_dir):
    assert str(resolve_model(tiny_model_dir)) == tiny_model_dir


def test_directory_without_pipeline(tmp_path):
    with pytest.raises(ModelUnavailable, match=r"no model_index\.json"):
        resolve_model(str(tmp_path))


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        resolve_model(str(tmp_path / "absent"))


def test_hub_id_without_network_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailable) as info:
        resolve_model("timbrooks/instruct-pix2pix")
    message = str(info.value)
    assert "could not be downloaded" in message
    assert "INSTRUCTEDIT_MODEL" in message
    assert "MODEL=tiny" in message
