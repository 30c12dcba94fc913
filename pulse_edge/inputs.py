"""Turn the files a user passes into RGB pages PULSE can read.

Formats are recognised by their content, never by the extension: PNG, JPEG, WebP, BMP, GIF (first frame),
TIFF (each frame a page), PDF (each page rendered at 200 dpi with pdfium) and DICOM (a 12-lead ECG waveform
drawn as the standard printout, an image in ``PixelData``, or an encapsulated PDF).

Every page comes back as ``mode == "RGB"``: EXIF orientation applied (phone photos), transparency flattened
on white (paper), 16-bit and float grayscale stretched to 8 bits by the image's own range.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps, UnidentifiedImageError

from pulse_edge.errors import ImageError

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# Refuse anything larger: a 120-megapixel RGB page is already 360 MB decoded.
MAX_PIXELS = 120_000_000
# PDF pages are rendered at this resolution, the longest side capped (an A0 poster would otherwise be 9000+ px).
PDF_DPI = 200
PDF_MAX_SIDE = 4000

FORMATS_TEXT = "PNG, JPEG, WebP, BMP, GIF, TIFF, PDF or DICOM"
SUPPORTED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".pdf", ".dcm"})
LIST_SUFFIXES = frozenset({".txt", ".lst"})

# Content signatures: (name, ((offset, bytes), ...)); every pair must match. PDF is searched for separately,
# since the format allows bytes before its header.
_SIGNATURES: tuple[tuple[str, tuple[tuple[int, bytes], ...]], ...] = (
    ("PNG", ((0, b"\x89PNG\r\n\x1a\n"),)),
    ("JPEG", ((0, b"\xff\xd8\xff"),)),
    ("GIF", ((0, b"GIF87a"),)),
    ("GIF", ((0, b"GIF89a"),)),
    ("TIFF", ((0, b"II*\x00"),)),
    ("TIFF", ((0, b"MM\x00*"),)),
    ("WEBP", ((0, b"RIFF"), (8, b"WEBP"))),
    ("DICOM", ((128, b"DICM"),)),
)
# "BM" alone is too weak (any text starting "BM..."): also require a known BMP info-header size.
_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_PDF_MAGIC = b"%PDF-"
_PDF_SEARCH = 1024

# Files people pass by mistake, named in the error so they know what to do.
_LOOKALIKES: tuple[tuple[int, bytes, str], ...] = (
    (4, b"ftypheic", "a HEIC photo: export it as JPEG"),
    (4, b"ftypheix", "a HEIC photo: export it as JPEG"),
    (4, b"ftypmif1", "a HEIF photo: export it as JPEG"),
    (4, b"ftypavif", "an AVIF image: export it as JPEG or PNG"),
    (0, b"PK\x03\x04", "a ZIP archive: unpack it and pass the images inside"),
    (0, b"\x1f\x8b", "a gzip archive: unpack it and pass the images inside"),
)

# Pillow modes that carry transparency to flatten on white paper.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# High-bit-depth grayscale: Pillow's convert("RGB") clips these at 255 (or zeroes floats), so stretch instead.
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})

# DICOM channel sensitivity units (UCUM codes) -> millivolts.
_UNITS_TO_MV = {"uV": 1e-3, "mV": 1.0, "V": 1e3, "nV": 1e-6}
_ASSUMED_UNIT = "uV"
_PDF_MIME = "application/pdf"


@dataclass(frozen=True)
class Page:
    """One page of one input file, ready for the vision encoder."""

    source: Path
    page: int  # 1-based
    image: Image.Image  # mode "RGB"
    kind: str  # "image" | "pdf" | "tiff" | "dicom-waveform" | "dicom-image" | "dicom-pdf"
    sha256: str  # of the source file's bytes


# -- finding inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MissingInput:
    """An input that does not exist, given directly or on a line of a list, and the message that says so."""

    path: Path
    error: str


def find_inputs(inputs: Sequence[PathLike], recursive: bool = False) -> list[Path]:
    """The image files named by ``inputs``, in order, each once.

    Files are kept as given (their content is checked later, by :func:`load`); folders expand to the
    supported files in them, sorted by name (into subfolders with ``recursive``; hidden files skipped); a
    ``.txt``/``.lst`` file is a list of paths, one a line, relative ones resolved against the list's folder,
    blank lines and ``#`` comment lines ignored. An input that does not exist is an error (see
    :func:`scan_inputs` to collect those instead).
    """
    found, missing = scan_inputs(inputs, recursive)
    if missing:
        raise ImageError(missing[0].error)
    return found


def scan_inputs(inputs: Sequence[PathLike], recursive: bool = False) -> tuple[list[Path], list[MissingInput]]:
    """Like :func:`find_inputs`, but the inputs that do not exist are returned (each once), not raised.

    The message of a path read from a list names the list and the line, so the typo can be fixed there.
    """
    found: list[Path] = []
    missing: dict[Path, MissingInput] = {}
    for path, where in _entries(inputs):
        if path.is_file() or path.is_dir():
            found.extend(_expand(path, recursive, where))
        else:
            fix = "; correct that line or remove it" if where else ""
            missing.setdefault(path.resolve(), MissingInput(path, f"{path}: no such file or folder{where}{fix}."))
    seen: set[Path] = set()
    unique: list[Path] = []
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, list(missing.values())


def _entries(inputs: Sequence[PathLike]) -> Iterator[tuple[Path, str]]:
    """Each input as given, a list replaced by the paths it lists; with where each was listed ("" if given)."""
    for item in inputs:
        path = Path(item)
        if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            yield from _read_list(path)
        else:
            yield path, ""


def _expand(path: Path, recursive: bool, where: str) -> list[Path]:
    if path.is_file():
        return [path]
    files = _folder_files(path, recursive)
    if not files:
        hint = ""
        if not recursive and any(child.is_dir() and not child.name.startswith(".") for child in path.iterdir()):
            hint = ", or add --recursive to look in its subfolders"
        raise ImageError(f"{path} holds no ECG images ({FORMATS_TEXT}){where}; pass files or a folder that has them{hint}.")
    return files


def _folder_files(folder: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return sorted(child for child in folder.iterdir() if _is_supported_file(child))
    files: list[Path] = []
    for root, dirs, names in os.walk(folder):  # does not follow symlinked folders: no loops
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        files.extend(Path(root, name) for name in names if _is_supported_file(Path(root, name)))
    return sorted(files)


def _is_supported_file(path: Path) -> bool:
    # Hidden files include macOS "._name.jpg" resource forks, which are not images despite the suffix.
    if path.name.startswith(".") or not path.is_file():
        return False
    suffix = path.suffix.lower()
    if suffix in SUPPORTED_SUFFIXES:
        return True
    if suffix:
        return False
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _read_list(path: Path) -> Iterator[tuple[Path, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ImageError(f"{path} is not a UTF-8 text list of files; save it as UTF-8 with one path per line.") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read it ({exc.strerror}).") from None
    entries = 0
    for number, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        entries += 1
        entry = Path(name).expanduser()
        yield (entry if entry.is_absolute() else path.parent / entry), f" (line {number} of {path})"
    if entries == 0:
        raise ImageError(f"{path} lists no files; write one image path per line.")


# -- loading ----------------------------------------------------------------------------------


def load(path: PathLike, page: int | None = None, *, max_pixels: int = MAX_PIXELS) -> list[Page]:
    """Every page of ``path`` (or only the 1-based ``page``) as RGB images."""
    return list(iter_pages(path, page, max_pixels=max_pixels))


def iter_pages(path: PathLike, page: int | None = None, *, max_pixels: int = MAX_PIXELS) -> Iterator[Page]:
    """Like :func:`load`, one page at a time (a long PDF never sits in memory all at once)."""
    source = Path(path)
    data = _read(source)
    fmt = _sniff(source, data)
    digest = hashlib.sha256(data).hexdigest()
    logger.debug("%s: %s, %d bytes", source, fmt, len(data))
    for number, kind, image in _FORMATS[fmt](source, data, page, max_pixels):
        yield Page(source, number, image, kind, digest)


def count_pages(path: PathLike) -> int:
    """How many pages :func:`load` would return, without decoding pixels."""
    source = Path(path)
    data = _read(source)
    return _COUNTERS[_sniff(source, data)](source, data)


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file or folder.") from None
    except IsADirectoryError:
        raise ImageError(f"{path} is a folder; pass the image files in it (or use find_inputs).") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read it ({exc.strerror}).") from None
    if not data:
        raise ImageError(f"{path} is empty.")
    return data


def _sniff(path: Path, data: bytes) -> str:
    head = data[:4096]
    for name, checks in _SIGNATURES:
        if all(head[offset:offset + len(magic)] == magic for offset, magic in checks):
            return name
    if _PDF_MAGIC in head[:_PDF_SEARCH]:
        return "PDF"
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    for offset, magic, what in _LOOKALIKES:
        if head[offset:offset + len(magic)] == magic:
            raise ImageError(f"{path} is not an image (it looks like {what}); pass a {FORMATS_TEXT} file.")
    if _looks_like_text(head):
        raise ImageError(f"{path} is not an image (it looks like text); pass a {FORMATS_TEXT} file.")
    raise ImageError(f"{path} is not an image in a format pulse-edge reads; pass a {FORMATS_TEXT} file.")


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
        return True
    except UnicodeDecodeError as exc:
        if exc.start >= len(head) - 3:  # a character cut by the 4 KiB window
            return True
    printable = sum(32 <= byte < 127 or byte in b"\t\n\r\f" for byte in head)
    return printable >= 0.95 * len(head)


def _select(path: Path, total: int, page: int | None) -> range:
    """0-based indices of the wanted pages."""
    if page is None:
        return range(total)
    if not 1 <= page <= total:
        noun = "page" if total == 1 else "pages"
        raise ImageError(f"{path} has {total} {noun}; --page must be 1..{total}.")
    return range(page - 1, page)


def _check_size(path: Path, width: int, height: int, max_pixels: int, where: str = "") -> None:
    if width * height > max_pixels:
        raise _bomb(path, width, height, max_pixels, where)


def _bomb(path: Path, width: int, height: int, max_pixels: int, where: str = "") -> ImageError:
    return ImageError(
        f"{path}{where} is {width} x {height} pixels, more than the {max_pixels / 1e6:g}-megapixel limit; "
        "it may be a decompression bomb. Resize it first."
    )


# -- raster images (Pillow) -------------------------------------------------------------------


_Pages = Iterator[tuple[int, str, Image.Image]]
_NAMES = {"WEBP": "WebP"}  # Pillow's format names, as people write them


def _open_raster(path: Path, data: bytes, fmt: str, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse oversized images before any pixel is decoded."""
    name = _NAMES.get(fmt, fmt)
    declared: tuple[int, int] | None = None
    with warnings.catch_warnings():
        # Pillow warns above its own global limit (89 MP); ours, checked below, is the one that counts.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=[fmt])
        except Image.DecompressionBombError:
            # Above twice Pillow's limit it refuses before returning the image: read the size from the header.
            declared = _declared_size(data, fmt)
        except UnidentifiedImageError:  # its message names a BytesIO object, no use to anyone
            raise ImageError(f"{path} is truncated or damaged ({name}: the header cannot be read); "
                             "copy or export it again.") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"{path} is truncated or damaged ({name}: {exc}); copy or export it again.") from None
    if declared is not None:
        raise _bomb(path, *declared, max_pixels)
    _check_size(path, *image.size, max_pixels)
    return image


def _declared_size(data: bytes, fmt: str) -> tuple[int, int]:
    factory = Image.OPEN[fmt][0]  # the format plugin itself parses the header without Pillow's size check
    header = factory(io.BytesIO(data), "")
    try:
        return header.size
    finally:
        header.close()


def _decode(path: Path, image: Image.Image, fmt: str, max_pixels: int, where: str = "") -> Image.Image:
    """Decode every pixel of the current frame and return it as upright RGB."""
    _check_size(path, *image.size, max_pixels, where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image.load()  # a full decode: truncated files fail here, not later in the encoder
        except Image.DecompressionBombError:  # a frame or tile larger than the image's own header says
            raise _bomb(path, *image.size, max_pixels, where) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"{path}{where} is truncated or damaged ({_NAMES.get(fmt, fmt)}: {exc}); "
                             "copy or export it again.") from None
    try:
        upright = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as exc:
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", path, type(exc).__name__)
        upright = image.copy()
    return to_rgb(upright, path)


def to_rgb(image: Image.Image, path: PathLike = "image") -> Image.Image:
    """``image`` as 8-bit RGB: transparency on white, wide grayscale stretched by its own range."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _WIDE_GRAY_MODES:
        return Image.fromarray(_stretch(_as_array(image)), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise ImageError(f"{path} uses the {mode} colour mode, which pulse-edge cannot convert; save it as RGB.") from None


def _as_array(image: Image.Image) -> np.ndarray:
    import numpy as np

    return np.asarray(image)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Scale any numeric array to uint8 by its own finite range (a constant array keeps its value, clipped)."""
    import numpy as np

    array = values.astype(np.float32)  # float32 is ample for 8-bit output and halves the memory of a large scan
    finite = np.isfinite(array)
    if not finite.any():
        return np.zeros(array.shape, np.uint8)
    low, high = float(array[finite].min()), float(array[finite].max())
    array = np.where(finite, array, low)
    if high > low:
        array = (array - low) * (255.0 / (high - low))
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _single_image(path: Path, data: bytes, page: int | None, max_pixels: int, fmt: str) -> _Pages:
    image = _open_raster(path, data, fmt, max_pixels)
    with image:
        _select(path, 1, page)
        yield 1, "image", _decode(path, image, fmt, max_pixels)  # animations: the first frame


def _tiff(path: Path, data: bytes, page: int | None, max_pixels: int) -> _Pages:
    image = _open_raster(path, data, "TIFF", max_pixels)
    with image:
        total = _frame_count(path, image)
        for index in _select(path, total, page):
            try:
                image.seek(index)
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise ImageError(f"{path} page {index + 1} is truncated or damaged (TIFF: {exc}); "
                                 "copy or export it again.") from None
            where = f" page {index + 1}" if total > 1 else ""
            yield index + 1, "tiff", _decode(path, image, "TIFF", max_pixels, where)


def _frame_count(path: Path, image: Image.Image) -> int:
    try:
        return int(getattr(image, "n_frames", 1))
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{path} is truncated or damaged (TIFF: {exc}); copy or export it again.") from None


def _count_tiff(path: Path, data: bytes) -> int:
    with _open_raster(path, data, "TIFF", MAX_PIXELS) as image:
        return _frame_count(path, image)


# -- PDF (pdfium) -----------------------------------------------------------------------------


def _pdf(path: Path, data: bytes, page: int | None, max_pixels: int) -> _Pages:
    for number, image in _render_pdf(path, data, page, max_pixels, "is"):
        yield number, "pdf", image


def _open_pdf(path: Path, data: bytes, verb: str) -> Any:
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if exc.err_code == pdfium_c.FPDF_ERR_PASSWORD:
            raise ImageError(f"{path} {verb} a password-protected PDF; save an unprotected copy first.") from None
        if exc.err_code == pdfium_c.FPDF_ERR_SECURITY:
            raise ImageError(f"{path} {verb} a PDF locked with an unsupported security scheme; "
                             "save an unprotected copy first.") from None
        raise ImageError(f"{path} {verb} a damaged PDF that pdfium cannot open ({exc}); export or save it again.") from None


def _render_pdf(path: Path, data: bytes, page: int | None, max_pixels: int, verb: str) -> Iterator[tuple[int, Image.Image]]:
    import pypdfium2 as pdfium

    document = _open_pdf(path, data, verb)
    try:
        total = len(document)
        if total == 0:
            raise ImageError(f"{path} {verb} a PDF with no pages; export it again.")
        for index in _select(path, total, page):
            where = f" page {index + 1}"
            try:
                pdf_page = document[index]
            except pdfium.PdfiumError:
                raise ImageError(f"{path}{where} is damaged: pdfium cannot load it; export the PDF again.") from None
            try:
                width_pt, height_pt = pdf_page.get_size()
                if width_pt <= 0 or height_pt <= 0:
                    raise ImageError(f"{path}{where} has no area ({width_pt:g} x {height_pt:g} points); export the PDF again.")
                scale = min(PDF_DPI / 72, PDF_MAX_SIDE / max(width_pt, height_pt))
                _check_size(path, round(width_pt * scale), round(height_pt * scale), max_pixels, where)
                try:
                    bitmap = pdf_page.render(scale=scale)
                except pdfium.PdfiumError as exc:
                    raise ImageError(f"{path}{where} cannot be rendered ({exc}); export the PDF again.") from None
                # convert() copies, so the image owns its pixels once pdfium's bitmap is gone.
                image = bitmap.to_pil().convert("RGB")
                del bitmap
            finally:
                pdf_page.close()
            yield index + 1, image
    finally:
        document.close()


def _count_pdf(path: Path, data: bytes) -> int:
    document = _open_pdf(path, data, "is")
    try:
        return len(document)
    finally:
        document.close()


# -- DICOM (pydicom) --------------------------------------------------------------------------


def _read_dicom(path: Path, data: bytes) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"{path} is a damaged DICOM file ({type(exc).__name__}: {exc}); export it again.") from None


def _dicom_content(dataset: Any) -> str | None:
    if "WaveformSequence" in dataset:
        return "waveform"
    if "PixelData" in dataset:
        return "image"
    if "EncapsulatedDocument" in dataset and str(dataset.get("MIMETypeOfEncapsulatedDocument", "")).strip() == _PDF_MIME:
        return "pdf"
    return None


def _no_dicom_content(path: Path) -> ImageError:
    return ImageError(f"{path} is a DICOM file with no ECG waveform, image or PDF in it; "
                      "export the ECG as a DICOM waveform, PDF or image.")


def _dicom(path: Path, data: bytes, page: int | None, max_pixels: int) -> _Pages:
    dataset = _read_dicom(path, data)
    content = _dicom_content(dataset)
    if content == "waveform":
        _select(path, 1, page)
        yield 1, "dicom-waveform", _render_waveform(path, dataset)
    elif content == "image":
        for number, image in _dicom_frames(path, dataset, page, max_pixels):
            yield number, "dicom-image", image
    elif content == "pdf":
        for number, image in _render_pdf(path, bytes(dataset.EncapsulatedDocument), page, max_pixels, "holds"):
            yield number, "dicom-pdf", image
    else:
        raise _no_dicom_content(path)


def _count_dicom(path: Path, data: bytes) -> int:
    dataset = _read_dicom(path, data)
    content = _dicom_content(dataset)
    if content == "waveform":
        return 1
    if content == "image":
        return _dicom_frame_count(dataset)
    if content == "pdf":
        document = _open_pdf(path, bytes(dataset.EncapsulatedDocument), "holds")
        try:
            return len(document)
        finally:
            document.close()
    raise _no_dicom_content(path)


def _render_waveform(path: Path, dataset: Any) -> Image.Image:
    import numpy as np

    from pulse_edge.ecgplot import leads_from_arrays, render

    groups = list(dataset.WaveformSequence)
    # The 12-lead rhythm group; failing that, the longest one (devices add short median-beat groups).
    index = next((i for i, group in enumerate(groups) if int(group.get("NumberOfWaveformChannels", 0) or 0) >= 12),
                 max(range(len(groups)), key=lambda i: int(groups[i].get("NumberOfWaveformSamples", 0) or 0)))
    group = groups[index]
    try:
        rate = float(group.SamplingFrequency)
        channels = list(group.ChannelDefinitionSequence)
        names = [_channel_name(channel) for channel in channels]
        scales = [_channel_scale(path, channel) for channel in channels]
        samples = np.asarray(dataset.waveform_array(index), dtype=np.float64) * np.asarray(scales)
    except ImageError:
        raise
    except (AttributeError, KeyError, IndexError, ValueError, TypeError) as exc:
        raise ImageError(f"{path} has a damaged ECG waveform ({type(exc).__name__}: {exc}); export it again.") from None
    recording = leads_from_arrays(names, samples, rate, 1.0)
    if not recording.leads:
        raise ImageError(f"{path} holds a waveform but none of its channels is an ECG lead (I, II, V1, ...); "
                         "export the 12-lead ECG.")
    if len(recording.leads) < 12:
        logger.info("%s: %d of 12 leads present; the others are left blank", path, len(recording.leads))
    return render(recording)


def _channel_name(channel: Any) -> str:
    sources = channel.get("ChannelSourceSequence") or []
    return str(sources[0].get("CodeMeaning", "")) if sources else ""


def _channel_scale(path: Path, channel: Any) -> float:
    units = channel.get("ChannelSensitivityUnitsSequence") or []
    code = str(units[0].get("CodeValue", "")).strip() if units else ""
    if not code:
        logger.warning("%s: a channel gives no sensitivity unit; assuming %s", path, _ASSUMED_UNIT)
        code = _ASSUMED_UNIT
    code = code.replace("\u00b5", "u").replace("\u03bc", "u")
    if code not in _UNITS_TO_MV:
        raise ImageError(f"{path} gives an ECG channel in unit {code!r}, not a voltage pulse-edge knows "
                         f"({', '.join(_UNITS_TO_MV)}); export it in microvolts.")
    return _UNITS_TO_MV[code]


def _dicom_frame_count(dataset: Any) -> int:
    return max(1, int(dataset.get("NumberOfFrames", 1) or 1))


def _dicom_frames(path: Path, dataset: Any, page: int | None, max_pixels: int) -> Iterator[tuple[int, Image.Image]]:
    import numpy as np

    total = _dicom_frame_count(dataset)
    indices = _select(path, total, page)
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    where = f" (DICOM image, {total} frames)" if total > 1 else " (DICOM image)"
    _check_size(path, columns, rows, max_pixels, where)
    if rows == 0 or columns == 0:
        raise ImageError(f"{path} has an empty DICOM image ({columns} x {rows}); export it again.")
    pixels = _pixel_array(path, dataset)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, dataset)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    colour = samples == 3 or photometric == "PALETTE COLOR"
    if total == 1:
        pixels = pixels[np.newaxis]
    for index in indices:
        frame = pixels[index]
        if colour:
            # pydicom already turned YBR into RGB; wider-than-8-bit colour is stretched as a whole.
            if frame.dtype != np.uint8:
                frame = _stretch(frame)
            image = Image.fromarray(np.ascontiguousarray(frame), "RGB")
        else:
            gray = frame if frame.dtype == np.uint8 else _stretch(frame)
            if photometric == "MONOCHROME1":  # 0 is white
                gray = 255 - gray
            image = Image.fromarray(np.ascontiguousarray(gray), "L").convert("RGB")
        yield index + 1, image


def _pixel_array(path: Path, dataset: Any) -> np.ndarray:
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    try:
        return dataset.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, KeyError, TypeError) as exc:
        if syntax is not None and syntax.is_compressed:
            raise ImageError(f"{path} stores its image compressed as {syntax.name}, which pulse-edge cannot decode; "
                             "export it uncompressed or as PNG first.") from None
        raise ImageError(f"{path} has damaged DICOM pixel data ({type(exc).__name__}: {exc}); export it again.") from None


# -- dispatch tables --------------------------------------------------------------------------


def _raster(fmt: str) -> Any:
    return lambda path, data, page, max_pixels: _single_image(path, data, page, max_pixels, fmt)


def _single_count(fmt: str) -> Any:
    def count(path: Path, data: bytes) -> int:
        _open_raster(path, data, fmt, MAX_PIXELS).close()  # header only: says whether it is readable at all
        return 1

    return count


_FORMATS: dict[str, Any] = {
    "PNG": _raster("PNG"),
    "JPEG": _raster("JPEG"),
    "GIF": _raster("GIF"),
    "BMP": _raster("BMP"),
    "WEBP": _raster("WEBP"),
    "TIFF": _tiff,
    "PDF": _pdf,
    "DICOM": _dicom,
}
_COUNTERS: dict[str, Any] = {
    **{fmt: _single_count(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP")},
    "TIFF": _count_tiff,
    "PDF": _count_pdf,
    "DICOM": _count_dicom,
}
