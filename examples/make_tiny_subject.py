"""Draw the tiny example subject: a red-capped toy before a blue backdrop, four shots (64x64 PNGs, no download).

The backdrop's shade changes from shot to shot (as the light would) but stays blue: the tiny model
learns one subject in one setting within a few hundred steps. Four unrelated backgrounds made its
images the toy on their average, a grey none of the photos has (-45 to -52 % to the nearest photo
where this subject reaches -57 to -62 %; docs/trainer.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUNDS = [(90, 140, 200), (110, 150, 190), (80, 130, 210), (100, 160, 200)]


def draw_subject(background: tuple[int, int, int], shift: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), background)
    draw = ImageDraw.Draw(image)
    x = 18 + shift
    draw.ellipse((x, 22, x + 28, 56), fill=(250, 210, 60))     # body
    draw.ellipse((x + 4, 10, x + 24, 30), fill=(250, 220, 120))  # head
    draw.pieslice((x + 2, 4, x + 26, 28), 180, 360, fill=(200, 30, 30))  # red cap
    draw.ellipse((x + 9, 17, x + 12, 20), fill=(0, 0, 0))
    draw.ellipse((x + 16, 17, x + 19, 20), fill=(0, 0, 0))
    return image


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, background in enumerate(BACKGROUNDS):
        draw_subject(background, shift=(index - 2) * 3).save(folder / f"toy-{index}.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("tiny-subject"))
