"""Edit parameters are checked locally, from the API's own declaration (EditParams),
before anything is sent."""

from __future__ import annotations

import httpx
import pytest

from instructedit import Client, InvalidRequestError
from instructedit._params import PARAM_NAMES, edit_fields
from services.common.edit_params import EditParams


def never(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"a request was sent: {request.method} {request.url}")


@pytest.fixture
def offline():
    with Client("http://sdk.invalid", "key", transport=httpx.MockTransport(never)) as c:
        yield c


def test_parameter_names_are_the_apis():
    assert set(PARAM_NAMES) == set(EditParams.model_fields) - {"prompt"}


@pytest.mark.parametrize(
    "params,code",
    [
        ({"num_inference_steps": 0}, "invalid_num_inference_steps"),
        ({"num_inference_steps": 101}, "invalid_num_inference_steps"),
        ({"guidance_scale": 30.5}, "invalid_guidance_scale"),
        ({"seed": -1}, "invalid_seed"),
        ({"num_outputs": 5}, "invalid_num_outputs"),
        ({"scheduler": "k_lms"}, "invalid_scheduler"),
        ({"scheduler": "lcm", "num_inference_steps": 90}, "invalid_scheduler"),
        ({"output_format": "gif"}, "invalid_output_format"),
        ({"output_quality": 0}, "invalid_output_quality"),
        ({"mask_feather": 65}, "invalid_mask_feather"),
        ({"negative_prompt": "x" * 501}, "invalid_negative_prompt"),
        # As form text "2.5", which the API refuses for an integer field.
        ({"num_inference_steps": 2.5}, "invalid_num_inference_steps"),
    ],
)
def test_bad_value_is_refused_before_any_request(offline, params, code):
    with pytest.raises(InvalidRequestError) as raised:
        offline.edit(b"not even an image", "make it red", **params)
    assert raised.value.code == code
    assert raised.value.status_code == 422 and raised.value.response is None


def test_bad_prompt_wait_and_webhook_events_are_refused_locally(offline):
    with pytest.raises(InvalidRequestError) as raised:
        offline.edit(b"x", "x" * 501)
    assert raised.value.code == "invalid_prompt"
    with pytest.raises(InvalidRequestError) as raised:
        offline.edit(b"x", "make it red", wait=61)
    assert raised.value.code == "invalid_wait"
    with pytest.raises(InvalidRequestError) as raised:
        offline.edit(b"x", "make it red", webhook_url="https://example.com/h", webhook_events=["x"])
    assert raised.value.code == "invalid_webhook_events"


def test_unknown_parameter_name_is_a_type_error(offline):
    with pytest.raises(TypeError, match="'num_steps'"):
        offline.edit(b"x", "make it red", num_steps=4)


def test_only_the_given_parameters_are_sent():
    fields = edit_fields(
        " make it red ",
        {"num_inference_steps": 4, "guidance_scale": 7.0, "mask_invert": True, "seed": None},
        webhook_url="https://example.com/hook",
        webhook_events=["start", "completed"],
    )
    assert fields == {
        "prompt": " make it red ",
        "num_inference_steps": "4",
        "guidance_scale": "7.0",
        "mask_invert": "true",
        "webhook_url": "https://example.com/hook",
        "webhook_events": "start,completed",
    }
