"""Cheap checks of a checkpoint file before anything unpacks it: what it really is, and how big.

Why: the loader is chosen by file extension, but users rename files, and a hostile or damaged file
can make a loader allocate gigabytes (a zip bomb inflated by `torch.load`, a safetensors header
length of 2**60) or fail with an error that names no file. These checks read a few bytes or the
zip's central directory only, so a bad file is refused in milliseconds with the file and the fix.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (pre-1.6, non-zip) format starts with a pickled magic number
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
MAX_UNPACKED_BYTES = 16 << 30  # 16 GiB: far above any StyleGAN2 checkpoint (1024^2 config-f: ~1 GiB)
MAX_UNPACK_RATIO = 8  # torch.save stores entries uncompressed; a checkpoint inflating more is a bomb
MAX_SAFETENSORS_HEADER = 100 << 20  # safetensors' own limit on the JSON header (100 MB)


def sniff(path: Path) -> str:
    """'empty', 'zip' (torch.save), 'torch-legacy', 'pickle', 'safetensors' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(TORCH_LEGACY_MAGIC):
        return "torch-legacy"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def zip_member(path: Path, suffix: str, limit: int = 64 << 20) -> bytes | None:
    """The bytes of the first zip member whose name ends with `suffix` (None if none or too large)."""
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.filename.endswith(suffix) and info.file_size <= limit:
                return z.read(info)
    return None


def check_zip_sizes(path: Path) -> None:
    """Refuse a zip checkpoint whose members declare more than it can honestly unpack to.

    Reads only the central directory. A torch.save archive stores its members uncompressed, so the
    declared total stays close to the file size; a zip bomb declares far more.
    """
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"{path}: damaged zip archive ({e}); re-download or re-export the checkpoint") from None
    declared = sum(i.file_size for i in infos)
    size = path.stat().st_size
    if declared > MAX_UNPACKED_BYTES or declared > MAX_UNPACK_RATIO * size + (1 << 20):
        raise ValueError(
            f"{path}: this {size:,}-byte archive declares {declared:,} bytes when unpacked "
            f"(a zip bomb, or not a torch.save checkpoint: torch stores tensors uncompressed); "
            "it was not loaded. Re-download the checkpoint from its source"
        )


def check_safetensors(path: Path) -> None:
    """Refuse an empty file or a safetensors header that is not a JSON object inside the file."""
    size = path.stat().st_size
    fix = "re-download or re-export it (`labelfoundry convert` writes this format)"
    if size < 8:
        raise ValueError(f"{path}: {'empty' if size == 0 else f'only {size} bytes'}, not a safetensors file; {fix}")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, MAX_SAFETENSORS_HEADER):
            kind = sniff(path)
            what = {"zip": "a torch.save zip archive (rename it to .pt)", "pickle": "a pickle (rename it to .pkl)"}.get(kind)
            raise ValueError(
                f"{path}: not a safetensors file" + (f": it is {what}" if what else
                                                    f" (header length {n:,} > file size {size:,}); {fix}")
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object (damaged file); {fix}")
