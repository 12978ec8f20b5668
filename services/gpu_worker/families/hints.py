"""What to tell an operator whose edit model cannot be found or loaded."""

NO_MODEL_HINT = (
    "Set INSTRUCTEDIT_MODEL to a local copy of an InstructPix2Pix pipeline (a directory with "
    "model_index.json), or run offline with a tiny model: `make run MODEL=tiny` "
    "(or MODEL=tiny-sdxl)."
)
