"""Repack the `sal-detectron2` wheel so pip installs it on any CPython 3.

The wheel carries upstream Detectron2's Python code, but its WHEEL file claims
cp310-cp310-linux_x86_64, so pip refuses it on 3.11. Its compiled `_C` extension is
built for 3.10 and cannot load anyway; Detectron2 runs without it for axis-aligned
Faster R-CNN (NMS and ROIAlign come from torchvision). This script rewrites the wheel
as pure Python (py3-none-any): drops `_C`, drops the stray top-level `tools/` package,
relaxes the `numpy<2` pin (it exists only for the binary), drops the lazily imported
black and tensorboard requirements, adds the omitted fvcore and
iopath dependencies, and writes a fresh RECORD.

Usage: python scripts/repack_detectron2.py SRC.whl OUT_DIR  (prints the new wheel path)
"""

import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _fix_metadata(text: str) -> str:
    text = re.sub(r"^Requires-Dist: numpy<2$", "Requires-Dist: numpy", text, flags=re.M)
    # black (config pretty-printing) and tensorboard (an optional event writer) are
    # imported lazily by Detectron2 and pull in much; leave them to users who want them.
    text = re.sub(r"^Requires-Dist: (black|tensorboard)$\n", "", text, flags=re.M)
    extra = "Requires-Dist: fvcore\nRequires-Dist: iopath\n"
    return text.replace("Requires-Dist: packaging\n", "Requires-Dist: packaging\n" + extra, 1)


def _fix_wheel(text: str) -> str:
    text = re.sub(r"^Root-Is-Purelib: .*$", "Root-Is-Purelib: true", text, flags=re.M)
    return re.sub(r"^Tag: .*$", "Tag: py3-none-any", text, flags=re.M)


def repack(src: Path, out_dir: Path) -> Path:
    name, version = src.name.split("-")[:2]
    dist_info = f"{name}-{version}.dist-info"
    out = out_dir / f"{name}-{version}-py3-none-any.whl"
    tmp = out.with_suffix(".whl.tmp")
    records = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            path = item.filename
            if path.startswith("tools/") or re.match(r"detectron2/_C\..*\.so$", path):
                continue
            if path == f"{dist_info}/RECORD" or item.is_dir():
                continue
            data = zin.read(item)
            if path == f"{dist_info}/METADATA":
                data = _fix_metadata(data.decode()).encode()
            elif path == f"{dist_info}/WHEEL":
                data = _fix_wheel(data.decode()).encode()
            elif path == f"{dist_info}/top_level.txt":
                data = b"detectron2\n"
            zout.writestr(path, data)
            records.append(_record_line(path, data))
        records.append(f"{dist_info}/RECORD,,")
        zout.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")
    tmp.replace(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    out_dir = Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    print(repack(Path(sys.argv[1]), out_dir))
