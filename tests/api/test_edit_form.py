"""The submit form, its OpenAPI schema and /docs derive from EditParams."""

from services.api.main import create_app
from services.common.edit_params import EditForm, EditParams
from services.common.settings import Settings


def form_schema() -> tuple[dict, dict]:
    spec = create_app(Settings()).openapi()
    body = spec["paths"]["/v1/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
    schemas = spec["components"]["schemas"]

    def resolve(schema):
        return schemas[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema

    form = resolve(body["schema"])
    properties = dict(form.get("properties", {}))
    required = set(form.get("required", []))
    for part in form.get("allOf", []):
        part = resolve(part)
        properties.update(part["properties"])
        required |= set(part.get("required", []))
    return properties, required


def test_every_parameter_is_a_documented_form_field():
    properties, required = form_schema()
    assert set(properties) == {"image", "mask", *EditForm.model_fields}
    assert required == {"image", "prompt"}
    for name, field in EditParams.model_fields.items():
        prop = properties[name]
        assert prop["description"] == field.description, name
        if not field.is_required() and field.default_factory is None:
            assert prop.get("default") == field.default, name


def test_bounds_reach_the_schema():
    properties, _ = form_schema()
    steps = properties["num_inference_steps"]
    assert (steps["minimum"], steps["maximum"]) == (1, 100)
    assert properties["prompt"]["maxLength"] == 500
