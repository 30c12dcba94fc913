"""pulse_edge.inputs: every supported format becomes upright RGB pages; every bad input gets its exact error."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pulse_edge import inputs
from pulse_edge.errors import ImageError
from tests.images import SCANS, dicom_page

FORMATS = "PNG, JPEG, WebP, BMP, GIF, TIFF, PDF or DICOM"
WHITE = (255, 255, 255)


def error_of(call, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ImageError) as info:
        call(*args, **kwargs)
    return str(info.value)


def only_page(path: Path, **kwargs) -> inputs.Page:  # type: ignore[no-untyped-def]
    pages = inputs.load(path, **kwargs)
    assert len(pages) == 1
    assert pages[0].image.mode == "RGB"
    return pages[0]


def near(pixel: Any, expected: tuple[int, ...], tolerance: int = 12) -> bool:
    """``pixel`` (an RGB ``getpixel`` result) within ``tolerance`` of ``expected`` in every channel."""
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def marked(width: int = 60, height: int = 30) -> Image.Image:
    """White with a red block in the top-left corner, to see where the corner ends up."""
    image = Image.new("RGB", (width, height), WHITE)
    image.paste((255, 0, 0), (0, 0, 10, 10))
    return image


# -- raster formats ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("BMP", ".bmp")])
def test_plain_formats_load_as_rgb_with_source_hash(tmp_path: Path, fmt: str, suffix: str) -> None:
    path = tmp_path / f"ecg{suffix}"
    marked().save(path, fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    page = only_page(path)
    assert (page.source, page.page, page.kind, page.image.size) == (path, 1, "image", (60, 30))
    assert page.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert near(page.image.getpixel((4, 4)), (255, 0, 0), 40)
    assert near(page.image.getpixel((50, 20)), WHITE)
    assert inputs.count_pages(path) == 1


def test_format_comes_from_content_not_extension(tmp_path: Path) -> None:
    path = tmp_path / "really-a-jpeg.png"
    marked().save(path, "JPEG")
    assert only_page(path).image.size == (60, 30)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    path = tmp_path / "phone.jpg"
    marked().save(path, "JPEG", quality=95, exif=exif)
    image = only_page(path).image
    assert image.size == (30, 60)
    assert near(image.getpixel((25, 4)), (255, 0, 0), 40)  # the top-left block is now top-right
    assert near(image.getpixel((4, 4)), WHITE, 40)


def test_rgba_is_flattened_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 5, 5))
    image.paste((0, 0, 0, 128), (10, 0, 15, 5))
    path = tmp_path / "alpha.png"
    image.save(path)
    loaded = only_page(path).image
    assert loaded.getpixel((15, 8)) == WHITE
    assert loaded.getpixel((2, 2)) == (0, 0, 255)
    assert near(loaded.getpixel((12, 2)), (127, 127, 127), 2)


def test_gray_alpha_and_transparent_palette_are_flattened_on_white(tmp_path: Path) -> None:
    gray = Image.new("LA", (8, 8), (0, 0))
    gray.paste((0, 255), (0, 0, 4, 8))
    gray.save(tmp_path / "la.png")
    loaded = only_page(tmp_path / "la.png").image
    assert (loaded.getpixel((1, 1)), loaded.getpixel((6, 1))) == ((0, 0, 0), WHITE)

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 200, 0, 0])
    palette.paste(1, (0, 0, 4, 8))
    palette.save(tmp_path / "p.png", transparency=0)
    loaded = only_page(tmp_path / "p.png").image
    assert (loaded.getpixel((1, 1)), loaded.getpixel((6, 1))) == ((200, 0, 0), WHITE)


def test_16_bit_gray_is_stretched_by_its_own_range(tmp_path: Path) -> None:
    values = np.tile(np.linspace(1000, 3000, 64).astype(np.uint16), (4, 1))
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as written:
        assert written.mode in ("I;16", "I")  # Pillow's plain convert("RGB") would clip all of it to white
    loaded = np.asarray(only_page(path).image)
    assert loaded[0, 0].tolist() == [0, 0, 0]
    assert loaded[0, -1].tolist() == [255, 255, 255]
    assert abs(int(loaded[0, 32, 0]) - round((values[0, 32] - 1000) / 2000 * 255)) <= 1


def test_float_gray_tiff_is_stretched(tmp_path: Path) -> None:
    values = np.tile(np.linspace(-1.0, 1.0, 32, dtype=np.float32), (4, 1))
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    loaded = np.asarray(only_page(path).image)
    assert (loaded[0, 0, 0], loaded[0, -1, 0]) == (0, 255)


def test_cmyk_and_gray_become_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert near(only_page(tmp_path / "cmyk.jpg").image.getpixel((8, 8)), (255, 0, 0))
    Image.new("L", (16, 16), 77).save(tmp_path / "gray.png")
    assert only_page(tmp_path / "gray.png").image.getpixel((8, 8)) == (77, 77, 77)


def test_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (12, 12), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    page = only_page(path)
    assert page.kind == "image"
    assert near(page.image.getpixel((6, 6)), (255, 0, 0), 2)


def test_multipage_tiff_each_frame_a_page_and_page_selection(tmp_path: Path) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (30 + i, 20), colour) for i, colour in enumerate(colours)]
    path = tmp_path / "scan.tiff"
    frames[0].save(path, save_all=True, append_images=frames[1:], compression="tiff_lzw")
    pages = inputs.load(path)
    assert [(p.page, p.kind, p.image.size, p.image.getpixel((5, 5))) for p in pages] == [
        (i + 1, "tiff", (30 + i, 20), colour) for i, colour in enumerate(colours)]
    assert inputs.count_pages(path) == 3
    (second,) = inputs.load(path, page=2)
    assert (second.page, second.image.getpixel((5, 5))) == (2, (0, 255, 0))
    assert error_of(inputs.load, path, page=4) == f"{path} has 3 pages; --page must be 1..3."
    assert error_of(inputs.load, path, page=0) == f"{path} has 3 pages; --page must be 1..3."


def test_page_out_of_range_for_single_image(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    marked().save(path)
    assert error_of(inputs.load, path, page=2) == f"{path} has 1 page; --page must be 1..1."


def test_name_with_spaces_and_non_ascii_letters(tmp_path: Path) -> None:
    folder = tmp_path / "Befunde Jürgen"
    folder.mkdir()
    path = folder / "ECG café 12 ü.png"
    marked().save(path)
    assert only_page(path).source == path
    assert inputs.find_inputs([folder], recursive=False) == [path]


# -- real scans -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, mode, size", [
    ("ecg00010.png", "RGBA", (768, 420)),
    ("ecg00015.png", "P", (999, 403)),
    ("ecg00019.bmp", "RGB", (640, 289)),
    ("ecg00005.jpg", "RGB", (2721, 2967)),
])
def test_real_scans(name: str, mode: str, size: tuple[int, int]) -> None:
    path = SCANS / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: the shared real-scan folder must sit beside the repository")
    with Image.open(path) as original:
        assert original.mode == mode
        # These scans are opaque, so flattening on white equals Pillow's plain conversion.
        expected = original.convert("RGB")
    page = only_page(path)
    assert (page.image.size, page.kind) == (size, "image")
    assert np.array_equal(np.asarray(page.image), np.asarray(expected))


# -- PDF --------------------------------------------------------------------------------------


def write_pdf(path: Path, pages: list[Image.Image], resolution: float = 100.0) -> None:
    pages[0].save(path, "PDF", resolution=resolution, save_all=True, append_images=pages[1:])


def test_pdf_pages_render_at_200_dpi(tmp_path: Path) -> None:
    path = tmp_path / "report.pdf"
    write_pdf(path, [marked(300, 200), Image.new("RGB", (200, 100), (0, 0, 255))])  # 3 x 2 inches, 2 x 1 inch
    pages = inputs.load(path)
    assert [(p.page, p.kind, p.image.mode, p.image.size) for p in pages] == [
        (1, "pdf", "RGB", (600, 400)), (2, "pdf", "RGB", (400, 200))]
    assert near(pages[0].image.getpixel((10, 10)), (255, 0, 0), 30)
    assert near(pages[0].image.getpixel((500, 300)), WHITE, 10)
    assert near(pages[1].image.getpixel((200, 100)), (0, 0, 255), 30)
    assert inputs.count_pages(path) == 2
    (second,) = inputs.load(path, page=2)
    assert second.page == 2 and second.image.size == (400, 200)
    assert error_of(inputs.load, path, page=3) == f"{path} has 2 pages; --page must be 1..2."


def test_large_pdf_page_is_capped_at_4000_pixels(tmp_path: Path) -> None:
    path = tmp_path / "poster.pdf"
    write_pdf(path, [Image.new("RGB", (300, 150), WHITE)], resolution=10.0)  # 30 x 15 inches
    assert only_page(path).image.size == (4000, 2000)


def rc4(key: bytes, data: bytes) -> bytes:
    state = list(range(256))
    j = 0
    for i in range(256):
        j = (j + state[i] + key[i % len(key)]) % 256
        state[i], state[j] = state[j], state[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + state[i]) % 256
        state[i], state[j] = state[j], state[i]
        out.append(byte ^ state[(state[i] + state[j]) % 256])
    return bytes(out)


def encrypted_pdf(user_password: bytes) -> bytes:
    """A one-page PDF behind the standard security handler (revision 2, RC4 40-bit), written by hand."""
    pad = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")
    padded = (user_password + pad)[:32]
    owner = rc4(hashlib.md5(padded).digest()[:5], padded)  # owner password = user password
    permissions = -4
    file_id = bytes(range(16))
    key = hashlib.md5(padded + owner + struct.pack("<i", permissions) + file_id).digest()[:5]
    user = rc4(key, pad)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 144 72] /Resources << >> >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <" + owner.hex().encode() + b"> /U <" + user.hex().encode()
        + b"> /P " + str(permissions).encode() + b" >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += (b"trailer\n<< /Size %d /Root 1 0 R /Encrypt 4 0 R /ID [<%s> <%s>] >>\nstartxref\n%d\n%%%%EOF\n"
            % (len(objects) + 1, file_id.hex().encode(), file_id.hex().encode(), xref))
    return bytes(out)


def test_password_protected_pdf(tmp_path: Path) -> None:
    import pypdfium2 as pdfium

    data = encrypted_pdf(b"secret")
    document = pdfium.PdfDocument(data, password="secret")  # a genuine encrypted PDF: the password opens it
    assert len(document) == 1
    document.close()
    path = tmp_path / "locked.pdf"
    path.write_bytes(data)
    expected = f"{path} is a password-protected PDF; save an unprotected copy first."
    assert error_of(inputs.load, path) == expected
    assert error_of(inputs.count_pages, path) == expected


def test_damaged_pdf(tmp_path: Path) -> None:
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 4)
    assert error_of(inputs.load, path) == (
        f"{path} is a damaged PDF that pdfium cannot open (Failed to load document (PDFium: Data format error).); "
        "export or save it again.")


# -- DICOM ------------------------------------------------------------------------------------


def test_dicom_ecg_waveform_renders_the_printout(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    source = Path(str(get_testdata_file("waveform_ecg.dcm", download=False)))
    path = tmp_path / "ecg"  # no extension: found by its DICM marker
    path.write_bytes(source.read_bytes())
    page = only_page(path)
    assert (page.kind, page.image.size) == ("dicom-waveform", (2200, 1700))
    dark = int((np.asarray(page.image.convert("L")) < 100).sum())
    assert 20_000 < dark < 400_000, dark  # twelve traces and a rhythm strip, not a blank grid
    assert np.array_equal(np.asarray(page.image), np.asarray(dicom_page()))  # microvolts read from the file
    assert inputs.count_pages(path) == 1
    assert inputs.find_inputs([tmp_path], recursive=False) == [path]


def dicom_file(path: Path, sop_class: Any, **elements: Any) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.1")
    meta.TransferSyntaxUID = elements.pop("TransferSyntaxUID", ExplicitVRLittleEndian)
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "OT"
    for name, value in elements.items():
        setattr(dataset, name, value)
    dataset.save_as(path, enforce_file_format=True)
    return path


def secondary_capture(path: Path, pixels: np.ndarray, photometric: str, frames: int = 1, **extra: Any) -> Path:
    from pydicom.uid import SecondaryCaptureImageStorage

    colour = photometric == "RGB"
    bits = pixels.dtype.itemsize * 8
    return dicom_file(
        path, SecondaryCaptureImageStorage, Rows=pixels.shape[-3 if colour else -2],
        Columns=pixels.shape[-2 if colour else -1], SamplesPerPixel=3 if colour else 1,
        PhotometricInterpretation=photometric, BitsAllocated=bits, BitsStored=bits, HighBit=bits - 1,
        PixelRepresentation=0, PixelData=pixels.tobytes(),
        **({"PlanarConfiguration": 0} if colour else {}), **({"NumberOfFrames": frames} if frames > 1 else {}), **extra)


def test_dicom_secondary_capture_monochrome2(tmp_path: Path) -> None:
    pixels = np.full((20, 30), 200, np.uint8)
    pixels[:5, :5] = 10
    page = only_page(secondary_capture(tmp_path / "sc.dcm", pixels, "MONOCHROME2"))
    assert (page.kind, page.image.size) == ("dicom-image", (30, 20))
    assert (page.image.getpixel((2, 2)), page.image.getpixel((20, 10))) == ((10, 10, 10), (200, 200, 200))


def test_dicom_secondary_capture_monochrome1_16_bit_is_inverted_and_stretched(tmp_path: Path) -> None:
    pixels = np.full((10, 10), 4000, np.uint16)
    pixels[0, 0] = 0
    page = only_page(secondary_capture(tmp_path / "sc16.dcm", pixels, "MONOCHROME1"))
    assert (page.image.getpixel((0, 0)), page.image.getpixel((5, 5))) == (WHITE, (0, 0, 0))


def test_dicom_secondary_capture_rgb_multiframe(tmp_path: Path) -> None:
    pixels = np.zeros((2, 12, 16, 3), np.uint8)
    pixels[0, ..., 0] = 255
    pixels[1, ..., 2] = 255
    path = secondary_capture(tmp_path / "rgb.dcm", pixels, "RGB", frames=2)
    pages = inputs.load(path)
    assert [(p.page, p.kind, p.image.size, p.image.getpixel((3, 3))) for p in pages] == [
        (1, "dicom-image", (16, 12), (255, 0, 0)), (2, "dicom-image", (16, 12), (0, 0, 255))]
    assert inputs.count_pages(path) == 2
    assert [p.page for p in inputs.load(path, page=2)] == [2]


def test_dicom_compressed_image_without_a_decoder(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless, SecondaryCaptureImageStorage

    path = dicom_file(tmp_path / "jls.dcm", SecondaryCaptureImageStorage, TransferSyntaxUID=JPEGLSLossless,
                      Rows=8, Columns=8, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2",
                      BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0,
                      PixelData=encapsulate([b"\xff\xd8\xff\xf7" + bytes(60)]))
    assert error_of(inputs.load, path) == (
        f"{path} stores its image compressed as JPEG-LS Lossless Image Compression, which pulse-edge cannot decode; "
        "export it uncompressed or as PNG first.")


def test_dicom_encapsulated_pdf(tmp_path: Path) -> None:
    from pydicom.uid import EncapsulatedPDFStorage

    buffer = io.BytesIO()
    marked(300, 200).save(buffer, "PDF", resolution=100.0)
    document = buffer.getvalue()
    path = dicom_file(tmp_path / "report.dcm", EncapsulatedPDFStorage, MIMETypeOfEncapsulatedDocument="application/pdf",
                      EncapsulatedDocument=document + b"\x00" * (len(document) % 2))
    page = only_page(path)
    assert (page.kind, page.image.size) == ("dicom-pdf", (600, 400))
    assert near(page.image.getpixel((10, 10)), (255, 0, 0), 30)


def test_dicom_with_nothing_to_read(tmp_path: Path) -> None:
    from pydicom.uid import SecondaryCaptureImageStorage

    path = dicom_file(tmp_path / "empty.dcm", SecondaryCaptureImageStorage, PatientName="Test^Nobody")
    assert error_of(inputs.load, path) == (
        f"{path} is a DICOM file with no ECG waveform, image or PDF in it; "
        "export the ECG as a DICOM waveform, PDF or image.")


# -- bad inputs -------------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    assert error_of(inputs.load, path) == f"{path} is empty."


def test_truncated_png(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert error_of(inputs.load, path) == (
        f"{path} is truncated or damaged (PNG: image file is truncated); copy or export it again.")


def test_truncated_jpeg(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert error_of(inputs.load, path).startswith(f"{path} is truncated or damaged (JPEG: image file is truncated")


def test_damaged_header(tmp_path: Path) -> None:
    path = tmp_path / "header.jpg"
    path.write_bytes(b"\xff\xd8\xff" + bytes(3))
    assert error_of(inputs.load, path) == (
        f"{path} is truncated or damaged (JPEG: the header cannot be read); copy or export it again.")


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("Sinus rhythm, rate 72.\nNo ST changes.\n", encoding="utf-8")
    assert error_of(inputs.load, path) == f"{path} is not an image (it looks like text); pass a {FORMATS} file."


def test_unknown_binary_and_lookalikes(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(bytes(range(256)) * 4)
    assert error_of(inputs.load, path) == f"{path} is not an image in a format pulse-edge reads; pass a {FORMATS} file."
    heic = tmp_path / "IMG_0001.jpg"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(100))
    assert error_of(inputs.load, heic) == (
        f"{heic} is not an image (it looks like a HEIC photo: export it as JPEG); pass a {FORMATS} file.")


def png_bomb(side: int) -> bytes:
    """A real 1-bit PNG of side x side pixels: every row is there, all zero, so it compresses to a few KB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(bytes((1 + (side + 7) // 8) * side), 9)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [13000, 20000])  # above our limit; 20000 is also above Pillow's own error limit
def test_decompression_bomb(tmp_path: Path, side: int) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(side))
    assert path.stat().st_size < 100_000
    assert error_of(inputs.load, path) == (
        f"{path} is {side} x {side} pixels, more than the 120-megapixel limit; it may be a decompression bomb. "
        "Resize it first.")


def test_pixel_limit_applies_to_pdf_pages_and_dicom(tmp_path: Path) -> None:
    pdf = tmp_path / "page.pdf"
    write_pdf(pdf, [Image.new("RGB", (300, 200), WHITE)])
    assert error_of(inputs.load, pdf, max_pixels=100_000) == (
        f"{pdf} page 1 is 600 x 400 pixels, more than the 0.1-megapixel limit; it may be a decompression bomb. "
        "Resize it first.")
    dicom = secondary_capture(tmp_path / "sc.dcm", np.zeros((400, 300), np.uint8), "MONOCHROME2")
    assert error_of(inputs.load, dicom, max_pixels=100_000) == (
        f"{dicom} (DICOM image) is 300 x 400 pixels, more than the 0.1-megapixel limit; it may be a decompression "
        "bomb. Resize it first.")


def test_missing_file_and_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    assert error_of(inputs.load, missing) == f"{missing}: no such file or folder."
    assert error_of(inputs.find_inputs, [missing], recursive=False) == f"{missing}: no such file or folder."
    assert error_of(inputs.load, tmp_path) == f"{tmp_path} is a folder; pass the image files in it (or use find_inputs)."


# -- finding inputs ---------------------------------------------------------------------------


def test_folder_without_images(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello", encoding="utf-8")
    (folder / "._ecg.png").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork, not an image
    expected = f"{folder} holds no ECG images ({FORMATS}); pass files or a folder that has them."
    assert error_of(inputs.find_inputs, [folder], recursive=False) == expected
    (folder / "sub").mkdir()
    marked().save(folder / "sub" / "a.png")
    assert error_of(inputs.find_inputs, [folder], recursive=False) == (
        f"{folder} holds no ECG images ({FORMATS}); pass files or a folder that has them, "
        "or add --recursive to look in its subfolders.")
    assert inputs.find_inputs([folder], recursive=True) == [folder / "sub" / "a.png"]


def test_folders_expand_sorted_and_recursive_on_request(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "sub/c.tif", "sub/deeper/d.pdf", ".hidden/e.png", "notes.txt", "z.dcm"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert inputs.find_inputs([tmp_path], recursive=False) == [tmp_path / "a.jpg", tmp_path / "b.PNG", tmp_path / "z.dcm"]
    assert inputs.find_inputs([tmp_path], recursive=True) == [
        tmp_path / "a.jpg", tmp_path / "b.PNG", tmp_path / "sub" / "c.tif", tmp_path / "sub" / "deeper" / "d.pdf",
        tmp_path / "z.dcm"]
    # Files stay in the order given, whatever their extension; each file appears once.
    given = [tmp_path / "notes.txt.bak", tmp_path / "a.jpg"]
    given[0].write_bytes(b"x")
    assert inputs.find_inputs([*given, tmp_path / "a.jpg"], recursive=False) == given


def test_list_file(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    (scans / "more").mkdir(parents=True)
    for name in ("one.png", "two é.png", "more/three.png"):
        marked().save(scans / name)
    listing = scans / "batch.lst"
    listing.write_text(f"# ward 3, morning\n\ntwo é.png\n  one.png  \n{scans / 'more'}\n# done\n", encoding="utf-8")
    assert inputs.find_inputs([listing], recursive=False) == [
        scans / "two é.png", scans / "one.png", scans / "more" / "three.png"]
    listing.write_text("one.png\nmissing.png\n", encoding="utf-8")
    assert error_of(inputs.find_inputs, [listing], recursive=False) == (
        f"{scans / 'missing.png'}: no such file or folder (line 2 of {listing}); correct that line or remove it.")
    listing.write_text("# nothing yet\n", encoding="utf-8")
    assert error_of(inputs.find_inputs, [listing], recursive=False) == (
        f"{listing} lists no files; write one image path per line.")


def test_scan_inputs_returns_what_does_not_exist_given_or_listed(tmp_path: Path) -> None:
    marked().save(tmp_path / "one.png")
    listing = tmp_path / "batch.txt"
    listing.write_text("one.png\n# a comment\ngone.png\ngone.png\n", encoding="utf-8")
    found, missing = inputs.scan_inputs([listing, tmp_path / "typo.png"], recursive=False)
    assert found == [tmp_path / "one.png"]
    assert missing == [  # each once, at its first mention
        inputs.MissingInput(tmp_path / "gone.png", f"{tmp_path / 'gone.png'}: no such file or folder (line 3 of "
                                                   f"{listing}); correct that line or remove it."),
        inputs.MissingInput(tmp_path / "typo.png", f"{tmp_path / 'typo.png'}: no such file or folder."),
    ]
