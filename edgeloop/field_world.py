"""A field that differs from the curated data, generated here: digits set in type, for the flywheel demo and tests.

The curated data are scikit-learn's handwritten digits (8×8, 17 grey levels, one writer's pen). The devices of the
flywheel demo meet digits printed on labels and screens instead: the same ten classes, drawn by the typefaces that
ship with matplotlib (DejaVu Sans/Serif/Mono, STIX and Computer Modern, upright, bold and italic), each jittered in
size, rotation, position and stroke weight, rendered large and reduced to the curated data's 8×8 grid with its 17
grey levels, plus some sensor noise. It is a real covariate shift (other strokes, the same labels), disjoint from
the curated images by construction, so nothing of the curated test set leaks into the field.

:func:`typeset_digits` returns model-ready inputs (the digits pipeline's preprocessing: grey levels / 16) and
labels; a seed fixes every draw.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf",
)
"""The typefaces the field is printed in (matplotlib's own font files: no download)."""
CANVAS = 64
"""Pixels of the square a digit is drawn on before it is reduced to 8×8."""


@lru_cache(maxsize=1)
def _fonts_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=64)
def _font(name: str, size: int):  # noqa: ANN202 - PIL.ImageFont.FreeTypeFont
    from PIL import ImageFont

    return ImageFont.truetype(str(_fonts_dir() / name), size)


def _draw(digit: int, font_name: str, rng: np.random.Generator) -> np.ndarray:
    """One digit on a CANVAS×CANVAS float image in [0, 1] (ink = 1), jittered."""
    from PIL import Image, ImageDraw, ImageFilter

    size = int(rng.integers(40, 56))
    image = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(image)
    font = _font(font_name, size)
    text = str(digit)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (CANVAS - (right - left)) / 2 - left + rng.uniform(-3, 3)
    y = (CANVAS - (bottom - top)) / 2 - top + rng.uniform(-3, 3)
    stroke = int(rng.integers(0, 3))
    draw.text((x, y), text, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    image = image.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.5))))
    return np.asarray(image, dtype=np.float32) / 255.0


def _to_digits_grid(canvas: np.ndarray) -> np.ndarray:
    """Crop to the ink's bounding box (square, like the curated digits' scanner did), reduce to 8×8 by area."""
    from PIL import Image

    rows, cols = np.nonzero(canvas > 0.1)
    if len(rows) == 0:
        return np.zeros((8, 8), np.float32)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(bottom - top, right - left) + 4
    cy, cx = (top + bottom) // 2, (left + right) // 2
    half = side // 2
    padded = np.pad(canvas, side)
    crop = padded[cy - half + side : cy - half + side + side, cx - half + side : cx - half + side + side]
    small = Image.fromarray((crop * 255).astype(np.uint8)).resize((8, 8), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def typeset_digits(count: int, *, seed: int = 0, noise: float = 0.06) -> tuple[np.ndarray, np.ndarray]:
    """``count`` typeset digits as the digits model takes them: float32 ``(count, 1, 8, 8)`` in [0, 1] on the curated
    data's grid of 17 grey levels (``level / 16``), and their int64 classes, balanced and shuffled. ``noise``: the
    standard deviation of the sensor noise added before the levels are rounded."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count, dtype=np.int64) % 10
    rng.shuffle(labels)
    images = np.empty((count, 1, 8, 8), np.float32)
    for i, digit in enumerate(labels):
        grid = _to_digits_grid(_draw(int(digit), FONT_FILES[int(rng.integers(len(FONT_FILES)))], rng))
        grid = grid / max(float(grid.max()), 1e-6) * rng.uniform(0.75, 1.0)
        grid = grid + rng.normal(0.0, noise, grid.shape)
        images[i, 0] = np.clip(np.rint(grid * 16), 0, 16) / 16.0
    return images, labels
