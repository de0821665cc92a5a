"""The input zoo: every kind of messy file a private folder holds, each converted by a documented
rule or rejected with a reason (docs/RELIABILITY.md section E). The zoo is generated here, never
stored."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privsynth import data
from privsynth.errors import DataError

NON_UTF8 = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_raw(width: int, height: int, depth: int, colour: int, rows: bytes) -> bytes:
    """A PNG written by hand: Pillow cannot write 16-bit colour, nor a lying header."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


def png16(arr: np.ndarray) -> bytes:
    """16-bit grey (H, W) or RGB (H, W, 3) PNG."""
    colour = 0 if arr.ndim == 2 else 2
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)
    return png_raw(arr.shape[1], arr.shape[0], 16, colour, rows)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kw)
    return buffer.getvalue()


def grey(value: int, size: int = 8) -> Image.Image:
    return Image.new("L", (size, size), value)


def _exif_rotated() -> bytes:
    """8x8, white top-left quadrant, EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    arr = np.zeros((8, 8), np.uint8)
    arr[:4, :4] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [grey(0).convert("P"), grey(255).convert("P")]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def _multipage_tiff() -> bytes:
    return _save(grey(50), "TIFF", save_all=True, append_images=[grey(200)])


def _palette_alpha() -> bytes:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([200, 0, 0, 0, 200, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    return _save(img, "PNG", transparency=1)  # index 1 (green) is fully transparent


def _rgba() -> bytes:
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0], arr[..., 3] = 255, 0
    arr[0, 0] = (255, 0, 0, 255)
    return _save(Image.fromarray(arr, "RGBA"), "PNG")


def _truncated(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    whole = _save(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), fmt)
    return whole[: len(whole) // 2]


# name -> (bytes, expected: "ok" or a fragment of the reject reason)
def zoo_files() -> dict[str, tuple[bytes, str]]:
    ok = _save(grey(120), "PNG")
    return {
        "a/ok.png": (ok, "ok"),
        "a/dup.png": (ok, "ok"),  # exact duplicate of ok.png: kept, counted by inspect
        "a/UPPER.PNG": (_save(grey(90), "PNG"), "ok"),
        "a/" + NON_UTF8: (_save(grey(60), "PNG"), "ok"),
        "a/nested/deeper/deep.png": (_save(grey(30), "PNG"), "ok"),
        "a/cmyk.jpg": (_save(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "JPEG"), "ok"),
        "a/grey16.png": (png16(np.full((8, 8), 1000, np.uint16)), "ok"),
        "a/rgb16.png": (png16(np.full((8, 8, 3), (65535, 32768, 1000), np.uint16)), "ok"),
        "a/onebit.png": (_save(grey(255).convert("1"), "PNG"), "ok"),
        "a/palette_alpha.png": (_palette_alpha(), "ok"),
        "a/rgba.png": (_rgba(), "ok"),
        "a/la.png": (_save(Image.merge("LA", [grey(255), grey(0)]), "PNG"), "ok"),
        "a/exif_rotated.jpg": (_exif_rotated(), "ok"),
        "a/animated.gif": (_animated_gif(), "ok"),
        "a/multipage.tif": (_multipage_tiff(), "ok"),
        "a/photo.webp": (_save(Image.new("RGB", (8, 8), (0, 0, 255)), "WEBP", lossless=True), "ok"),
        "b/only.jpeg": (_save(Image.new("RGB", (12, 8), (10, 20, 30)), "JPEG"), "ok"),
        "a/truncated.jpg": (_truncated("JPEG"), "truncated"),
        "a/truncated.png": (_truncated("PNG"), "Error"),
        "a/zero.png": (b"", "empty file"),
        "a/text.png": (b"this is not an image\n", "accepted format"),
        "a/photo.heic": (b"\x00\x00\x00\x18ftypheic", "not an image type"),
        "a/pcx_inside.png": (_save(Image.new("RGB", (4, 4)), "PCX"), "accepted format"),
        "a/bomb.png": (png_raw(100_000, 100_000, 8, 0, b"\x00" * 64), "decompression-bomb"),
        "a/.DS_Store": (b"\x00\x00\x00\x01Bud1", "hidden file"),
        "a/._ok.png": (ok, "hidden file"),
        "a/.thumbs/t.png": (ok, "inside a hidden folder"),
        "a/notes.txt": (b"notes", "not an image type"),
        "loose.png": (ok, "not in a class folder"),
    }


def make_zoo(root: Path) -> dict[str, str]:
    """Write the zoo under `root`; return {relative path as displayed: expected outcome}."""
    expected = {}
    for rel, (content, outcome) in zoo_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        expected[data.display(rel)] = outcome
    (root / "empty").mkdir()
    os.symlink("loop.png", root / "a" / "loop.png")  # a link to itself
    os.symlink("..", root / "a" / "up")  # a folder link back up: would loop if followed
    expected.update({"a/loop.png": "symlink loop", "a/up": "symlink to a folder"})
    return expected


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("zoo") / "private"
    return root, make_zoo(root)


def test_every_zoo_entry_is_accepted_or_rejected_with_its_reason(zoo) -> None:
    root, expected = zoo
    listing = data.scan(root)
    loaded = data.load(listing, resolution=8, channels=3)
    rejects = dict(loaded.rejects)
    accepted = len(loaded)
    assert accepted + len(rejects) == len(expected) == listing.seen
    for rel, outcome in expected.items():
        if outcome == "ok":
            assert rel not in rejects, (rel, rejects.get(rel))
        else:
            assert outcome.lower() in rejects[rel].lower(), (rel, rejects.get(rel))
    assert listing.layout == "imagefolder" and listing.classes == ("a", "b")
    assert accepted == sum(v == "ok" for v in expected.values()) == 17
    notes = " | ".join(listing.notes)
    assert "empty" in notes and "nested folders read into their top-level class: a" in notes


def _one(root: Path, rel: str, channels: int = 3, resolution: int = 8) -> np.ndarray:
    return data.read(root / rel, resolution, channels)


def test_conversion_rules(zoo) -> None:
    root, _ = zoo
    assert (_one(root, "a/grey16.png", 1) == 4).all()  # round(1000 * 255 / 65535), not clipped
    assert tuple(_one(root, "a/rgb16.png")[:, 3, 3]) == (255, 128, 3)  # high byte
    rgba = _one(root, "a/rgba.png")
    assert tuple(rgba[:, 0, 0]) == (255, 0, 0) and (rgba[:, 1:, 1:] == 0).all()  # alpha on black
    pal = _one(root, "a/palette_alpha.png")
    assert tuple(pal[:, 0, 0]) == (200, 0, 0) and (pal[:, 1:, 1:] == 0).all()
    assert (_one(root, "a/la.png") == 0).all()
    assert (_one(root, "a/onebit.png", 1) == 255).all()
    assert (_one(root, "a/animated.gif", 1) == 0).all()  # first frame only
    assert (_one(root, "a/multipage.tif", 1) == 50).all()  # first page only
    cmyk = _one(root, "a/cmyk.jpg")
    assert cmyk[0].mean() > 200 and cmyk[1].mean() < 60  # magenta ink -> (255, 0, 255)
    rotated = _one(root, "a/exif_rotated.jpg", 1)[0]
    assert rotated[:4, 4:].mean() > 200 and rotated[:4, :4].mean() < 50  # turned 90 degrees cw
    assert _one(root, "b/only.jpeg").shape == (3, 8, 8)  # 12x8: centre square, no distortion


def test_thin_strip_is_cropped_before_resizing(tmp_path: Path) -> None:
    """A 1 x 200000 strip must not be scaled to 64 x 12.8 million pixels first."""
    Image.new("L", (1, 200_000), 7).save(tmp_path / "strip.png")
    assert (data.read(tmp_path / "strip.png", 64, 1) == 7).all()


def test_bomb_is_rejected_from_its_header_under_1gb(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(png_raw(100_000, 100_000, 8, 0, b"\x00" * 64))
    (tmp_path / "ok.png").write_bytes(_save(grey(1), "PNG"))
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc for the peak memory of the child alone")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) forking test process
    code = ("import re; from privsynth import data; "
            f"s = data.load(data.scan({str(tmp_path)!r}), resolution=8, channels=1); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
            "print(len(s), s.rejects[0][1], hwm)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    n, *why, peak_kb = done.stdout.split()
    assert n == "1" and "decompression-bomb" in " ".join(why)
    assert int(peak_kb) < 1024 * 1024


def test_folder_rules(tmp_path: Path) -> None:
    for name in ("Cat", "cat"):
        (tmp_path / "case" / name).mkdir(parents=True)
        grey(1).save(tmp_path / "case" / name / "x.png")
    with pytest.raises(DataError, match="differ only in case"):
        data.scan(tmp_path / "case")
    (tmp_path / "one" / "only").mkdir(parents=True)
    grey(1).save(tmp_path / "one" / "only" / "x.png")
    single = data.scan(tmp_path / "one")
    assert single.classes == ("only",) and "single class" in single.notes[0]
    bad = tmp_path / "bad" / os.fsdecode(b"caf\xe9")
    bad.mkdir(parents=True)
    grey(1).save(bad / "x.png")
    with pytest.raises(DataError, match="UTF-8"):
        data.scan(tmp_path / "bad")
    (tmp_path / "own" / "x").mkdir(parents=True)
    grey(1).save(tmp_path / "own" / "x" / "y.png")
    (tmp_path / "own" / ".privsynth-dataset").write_text("ledger id\n")  # privsynth's own marker
    assert data.scan(tmp_path / "own").seen == 1
    (tmp_path / "nothing" / ".hidden").mkdir(parents=True)
    (tmp_path / "nothing" / ".hidden" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="no images"):
        data.scan(tmp_path / "nothing")


def test_metadata_layout_rejects_unlisted_and_missing(tmp_path: Path) -> None:
    for name in ("x.png", "y.png", "extra.png"):
        grey(3).save(tmp_path / name)
    rows = [{"file_name": "x.png", "label": "p"}, {"file_name": "y.png", "label": "q"},
            {"file_name": "gone.png", "label": "q"}, {"file_name": "../out.png", "label": "q"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    listing = data.scan(tmp_path)
    assert listing.classes == ("p", "q") and len(listing.files) == 2
    reasons = dict(listing.skipped)
    assert reasons == {"extra.png": "not listed in metadata.jsonl",
                       "gone.png": "listed in metadata.jsonl but not found",
                       "../out.png": "metadata.jsonl names a path outside the folder"}


# --- the command line on the zoo: inspect, fit --strict, rejects.jsonl, what sample publishes ---

def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def test_inspect_reports_everything_and_writes_nothing(zoo, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from privsynth.cli import app

    root, expected = zoo
    monkeypatch.chdir(tmp_path)
    before = _tree(root)
    result = CliRunner().invoke(app, ["inspect", str(root), "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["accepted"] + found["rejected"] == found["seen"] == len(expected)
    assert found["classes"] == {"a": 16, "b": 1}
    assert found["duplicates"]["groups"] == 1 and found["duplicates"]["extra_copies"] == 1
    assert {r["file"] for r in found["rejects"]} == {k for k, v in expected.items() if v != "ok"}
    assert found["modes"]["I;16"] == 1 and found["formats"]["TIFF"] == 1
    assert _tree(root) == before and not list(tmp_path.iterdir())
    strict = CliRunner().invoke(app, ["inspect", str(root), "--strict"])
    assert strict.exit_code == 3 and "rejected" in strict.stderr


TINY = ["--set", "dpmepf.steps=2", "--set", "dpmepf.batch_per_class=2", "--set", "dpmepf.width=8",
        "--set", "data.resolution=8", "--set", "features.input_size=32",
        # the Config class values these tests were written for, not the defaults (test_defaults)
        "--set", "features.grid=1", "--set", "dpmepf.split_bits=0", "--set", "dpmepf.lr=0.001",
        "--set", "dpmepf.judge=false", "--set", "dpmepf.scatter_judge=false",
        "--set", "dpmepf.split_noise=0", "--set", "dpmepf.unbiased=false"]


def test_fit_strict_refuses_before_any_budget(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from privsynth.cli import app

    root = tmp_path / "private"
    make_zoo(root)
    result = CliRunner().invoke(app, ["fit", str(root), "--method", "dp-mepf", "--epsilon", "2",
                                      "--out", str(tmp_path / "run"), "--strict", *TINY])
    assert result.exit_code == 3, result.output
    assert "--strict: 14 of 31 entries" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()
    assert not (root / ".privsynth-dataset").exists()  # refused before the ledger was touched


def _png_chunks(blob: bytes) -> list[bytes]:
    kinds, at = [], 8
    while at < len(blob):
        (length,) = struct.unpack(">I", blob[at:at + 4])
        kinds.append(blob[at + 4:at + 8])
        at += 12 + length
    return kinds


def test_fit_lists_rejects_and_sample_publishes_no_private_names(zoo, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from privsynth.cli import app

    root, expected = zoo
    run, synth = tmp_path / "run", tmp_path / "synth"
    result = CliRunner().invoke(app, ["fit", str(root), "--method", "dp-mepf", "--epsilon", "2",
                                      "--out", str(run), "--json", *TINY])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "owner" / "rejects.jsonl").read_text().splitlines()]
    assert {r["file"] for r in rows} == {k for k, v in expected.items() if v != "ok"}
    assert json.loads(result.stdout)["rejected_files"] == len(rows) == 14
    assert data.scan(root).seen == len(expected)  # fit left nothing the next scan would see
    done = CliRunner().invoke(app, ["sample", str(run), "-n", "6", "--out", str(synth)])
    assert done.exit_code == 0, done.output
    pngs = sorted(synth.rglob("*.png"))
    assert len(pngs) == 6
    for png in pngs:
        assert _png_chunks(png.read_bytes()) == [b"IHDR", b"IDAT", b"IEND"]  # no tEXt/eXIf/iTXt
    names = [b"exif_rotated", b"palette_alpha", b"pcx_inside", b"multipage", b"truncated",
             b"animated", b"grey16", b"UPPER", b"DS_Store", b"caf\xe9", b"caf\\xe9",
             str(root).encode(), root.parent.name.encode()]
    published = [p for p in synth.rglob("*") if p.is_file()] + [  # the run's publishable part too
        p for p in run.rglob("*") if p.is_file() and "owner" not in p.relative_to(run).parts]
    assert len(published) > 6 + 5 and json.loads(result.stdout)["owner_only"] == str(run / "owner")
    assert not (synth / "rejects.jsonl").exists()
    for path in published:
        blob = path.read_bytes()
        leaked = [n for n in names if n in blob]
        assert not leaked, (path.name, leaked)
