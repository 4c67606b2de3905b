"""Writes the small real-world image files of tests/data/ that the image loader must read:
a greyscale JPEG, a progressive JPEG and a phone-style JPEG whose EXIF orientation says
"rotate 90° clockwise". Made with Pillow (pip install pillow); the files are committed, this
script documents how. Usage: python3 scripts/testdata/make_images.py tests/data
"""
import sys
from pathlib import Path

from PIL import Image

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data")

# 16×8, left half red, right half blue (a rotation is visible in where red ends up).
img = Image.new("RGB", (16, 8))
for y in range(8):
    for x in range(16):
        img.putpixel((x, y), (220, 30, 30) if x < 8 else (30, 30, 220))

img.convert("L").save(out / "grey_16x8.jpg", quality=95)
img.save(out / "progressive_16x8.jpg", quality=95, progressive=True)
# Stored as 16×8; EXIF Orientation 6 = the viewer rotates it 90° clockwise (8×16 upright),
# which puts the left (red) half at the top.
exif = Image.Exif()
exif[0x0112] = 6
img.save(out / "exif_orientation6_16x8.jpg", quality=95, exif=exif.tobytes())
