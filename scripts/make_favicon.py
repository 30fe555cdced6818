"""Draws app/static/favicon.ico (16, 32 and 48 px): three bars of falling length, like the
try-it page's top-k scores. Run it again only to change the icon; the result is committed."""

from pathlib import Path

from PIL import Image, ImageDraw

ICON = Path(__file__).resolve().parents[1] / "app" / "static" / "favicon.ico"


def draw(size: int = 48) -> Image.Image:
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    pen = ImageDraw.Draw(image)
    pen.rounded_rectangle((0, 0, size - 1, size - 1), radius=size // 6, fill=(31, 58, 95, 255))
    unit, left = size / 12, size / 6
    for row, length in enumerate((0.66, 0.46, 0.28)):
        top = unit * (2.2 + 2.8 * row)
        pen.rectangle((left, top, left + length * size, top + 1.8 * unit), fill=(94, 196, 255))
    return image


if __name__ == "__main__":
    draw().save(ICON, sizes=[(16, 16), (32, 32), (48, 48)])
    print(f"wrote {ICON}")
