"""Convert third-party detector weights from a pickle to a tensors-only ``.pth``, once.

    python -m pipelines.convert_weights weights/faster_rcnn_from_caffe.pkl [--out FILE.pth]
                                        [--sha256 HEX]

Runs never unpickle weights (unpickling runs code). This command reads the pickle with an
unpickler that can build only numpy arrays and plain containers, so a file that asks for
anything else is refused without running it, and writes FILE.pth (default: the same name with
``.pth``), which extraction then loads with ``torch.load(weights_only=True)``. ``--sha256``
checks the pickle against a published checksum before reading it. Prints both checksums as
JSON: record the output's in ``weights/manifest.json``.

Exit status: 0 converted; 2 bad input (missing file, wrong checksum, refused content, an
existing output that is not a previous conversion of the same file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipelines import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m pipelines.convert_weights", __doc__)
    parser.add_argument("source", type=Path, help="the weights pickle (.pkl)")
    parser.add_argument("--out", type=Path, help="the .pth to write (default: SOURCE.pth)")
    parser.add_argument("--sha256", help="expected sha256 of SOURCE, checked before reading")
    args = parser.parse_args(argv)
    from detector.weights import convert_pickle

    src, out = args.source, args.out or args.source.with_suffix(".pth")
    try:
        if not src.is_file():
            raise ValueError(f"weights file not found: {src}")
        if out.resolve() == src.resolve():
            raise ValueError(f"--out {out} would overwrite the source")
        if out.suffix != ".pth":
            raise ValueError(f"--out {out} must end in .pth (runs read .pth files as tensors)")
        if out.exists():
            raise ValueError(f"{out} exists; remove it or choose another --out")
        report = convert_pickle(src, out, expected_sha256=args.sha256)
    except (OSError, ValueError) as e:
        return cli.fail(e)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
