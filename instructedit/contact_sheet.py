"""The guidance sweep's contact sheet: one cell per (S_I, S_T), as in the InstructPix2Pix
paper's guidance figure. Rows are image guidance S_I, columns text guidance S_T."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
FAILED = (225, 225, 225)
# Cells are scaled so that their longer side is within these bounds: small test images grow
# to something one can see, large photos shrink to a sheet one can open.
MIN_CELL = 160
MAX_CELL = 384
GAP = 8
MARGIN = 16


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def format_scale(value: float) -> str:
    return f"{value:g}"


def cell_size(images: Sequence[Image.Image | None]) -> tuple[int, int]:
    """The size every cell is drawn at: the first image's aspect, scaled into bounds."""
    first = next((image for image in images if image is not None), None)
    width, height = first.size if first is not None else (MIN_CELL, MIN_CELL)
    longer = max(width, height)
    scale = min(max(longer, MIN_CELL), MAX_CELL) / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def compose(
    cells: Mapping[tuple[float, float], Image.Image | str | None],
    image_scales: Sequence[float],
    text_scales: Sequence[float],
    title: str | None = None,
) -> Image.Image:
    """The sheet: ``cells[(s_i, s_t)]`` is the edited image, or a string saying why there
    is none (a failed job), for each image guidance ``s_i`` (a row) and text guidance
    ``s_t`` (a column)."""
    images = [value if isinstance(value, Image.Image) else None for value in cells.values()]
    cell_w, cell_h = cell_size(images)
    font = _font(14)
    small = _font(12)
    axis_font = _font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Sg=0.5", font)[1] + 6
    caption_h = _text_size(probe, "Sg=0.5", small)[1] + 6
    axis_h = _text_size(probe, "Sg", axis_font)[1] + 8

    rows, cols = len(image_scales), len(text_scales)
    row_labels = [f"S_I = {format_scale(s)}" for s in image_scales]
    col_labels = [f"S_T = {format_scale(s)}" for s in text_scales]
    row_label_w = max(_text_size(probe, label, font)[0] for label in row_labels) + GAP
    title_h = line_h + GAP if title else 0

    left = MARGIN + axis_h + row_label_w + GAP
    top = MARGIN + title_h + axis_h + line_h
    grid_w = cols * cell_w + (cols - 1) * GAP
    grid_h = rows * (cell_h + caption_h) + (rows - 1) * GAP
    width = max(left + grid_w + MARGIN, _text_size(probe, title or "", font)[0] + 2 * MARGIN)
    height = top + grid_h + MARGIN
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    if title:
        draw.text((MARGIN, MARGIN), title, fill=INK, font=font)
    # The column axis: its name centred over the columns, then each column's value.
    axis = "text guidance S_T"
    axis_w = _text_size(draw, axis, axis_font)[0]
    draw.text((left + (grid_w - axis_w) // 2, MARGIN + title_h), axis, fill=INK, font=axis_font)
    for c, label in enumerate(col_labels):
        label_w = _text_size(draw, label, font)[0]
        x = left + c * (cell_w + GAP) + (cell_w - label_w) // 2
        draw.text((x, MARGIN + title_h + axis_h), label, fill=INK, font=font)
    # The row axis: its name written upwards along the left edge, then each row's value.
    axis = "image guidance S_I"
    axis_w = _text_size(draw, axis, axis_font)[0]
    strip = Image.new("RGB", (axis_w + 4, axis_h), BACKGROUND)
    ImageDraw.Draw(strip).text((2, 0), axis, fill=INK, font=axis_font)
    strip = strip.rotate(90, expand=True)
    sheet.paste(strip, (MARGIN, top + max(0, (grid_h - strip.height) // 2)))
    for r, label in enumerate(row_labels):
        label_h = _text_size(draw, label, font)[1]
        y = top + r * (cell_h + caption_h + GAP) + (cell_h - label_h) // 2
        draw.text((MARGIN + axis_h, y), label, fill=INK, font=font)

    for r, s_i in enumerate(image_scales):
        for c, s_t in enumerate(text_scales):
            x = left + c * (cell_w + GAP)
            y = top + r * (cell_h + caption_h + GAP)
            value = cells.get((s_i, s_t))
            if isinstance(value, Image.Image):
                sheet.paste(value.convert("RGB").resize((cell_w, cell_h)), (x, y))
            else:
                draw.rectangle((x, y, x + cell_w - 1, y + cell_h - 1), fill=FAILED)
                draw.text((x + 6, y + 6), str(value or "missing"), fill=INK, font=small)
            caption = f"S_I {format_scale(s_i)} \u00b7 S_T {format_scale(s_t)}"
            draw.text((x, y + cell_h + 3), caption, fill=MUTED, font=small)
    return sheet
