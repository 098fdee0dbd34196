"""Photos are checked on the user's machine: every bad file is named with its reason."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dreambooth_client.photos import MAX_PHOTOS, PhotoProblems, check_photos

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-subject"


def jpeg_bytes(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    shutil.copytree(EXAMPLE, folder)
    return folder


def test_the_example_subject_passes(photos: Path) -> None:
    found = check_photos(photos, resolution=32)
    assert [p.path.name for p in found] == ["toy-0.png", "toy-1.png", "toy-2.png", "toy-3.png"]
    assert {p.format for p in found} == {"PNG"} and all(p.width == 64 for p in found)


def test_an_empty_folder_says_how_many_photos_are_needed(tmp_path: Path) -> None:
    with pytest.raises(PhotoProblems) as error:
        check_photos(tmp_path, resolution=32)
    assert str(error.value) == (f"{tmp_path}: no photos (*.jpg, *.jpeg, *.png, *.webp, *.bmp); "
                                "DreamBooth needs 3-20 photos of the subject")


def test_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(PhotoProblems, match="no such folder"):
        check_photos(tmp_path / "nope", resolution=32)


def test_each_bad_file_gets_its_own_line(photos: Path) -> None:
    (photos / "cut.jpg").write_bytes(jpeg_bytes()[:300])  # a truncated JPEG
    (photos / "notes.txt").write_text("my dog")
    (photos / "empty.png").write_bytes(b"")
    (photos / "fake.jpg").write_bytes(b"GIF89a not really")
    (photos / ".DS_Store").write_bytes(b"\0")  # hidden files are not photos, and not errors
    with pytest.raises(PhotoProblems) as error:
        check_photos(photos, resolution=32)
    problems = error.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith(f"{photos / 'cut.jpg'}: not a readable image (")
    assert problems[1] == f"{photos / 'empty.png'}: empty file"
    assert problems[2].startswith(f"{photos / 'fake.jpg'}: not a readable image")
    assert problems[3] == f"{photos / 'notes.txt'}: not a photo (expected .jpg, .jpeg, .png, .webp, .bmp)"


def test_photos_too_small_for_the_resolution(photos: Path) -> None:
    with pytest.raises(PhotoProblems) as error:
        check_photos(photos, resolution=512)
    assert len(error.value.problems) == 4
    assert error.value.problems[0].endswith("64x64 px is too small: at least 256 px on the shorter side for training at 512 px")


def test_too_few_and_too_many(photos: Path) -> None:
    for extra in list(photos.iterdir())[2:]:
        extra.unlink()
    with pytest.raises(PhotoProblems, match="only 2 photos"):
        check_photos(photos, resolution=32)
    for index in range(MAX_PHOTOS + 1):
        (photos / f"more-{index}.jpg").write_bytes(jpeg_bytes())
    with pytest.raises(PhotoProblems, match=f"{MAX_PHOTOS + 3} photos; DreamBooth needs 3-20"):
        check_photos(photos, resolution=32)


def test_the_format_is_read_from_the_bytes_not_the_name(photos: Path) -> None:
    (photos / "toy-0.png").write_bytes(jpeg_bytes())
    first = check_photos(photos, resolution=32)[0]
    assert first.format == "JPEG" and first.content_type == "image/jpeg"
