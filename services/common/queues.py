"""Queue and task names shared by the API (producer) and the workers (consumers)."""

EDITS_QUEUE = "edits"
DATAGEN_QUEUE = "datagen"

EDIT_TASK = "instructedit.edit"

DATAGEN_CHUNK_TASK = "instructedit.datagen.rows"
DATAGEN_EXPORT_TASK = "instructedit.datagen.export"
