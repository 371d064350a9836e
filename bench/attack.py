"""Memory a decode costs on the bombs of the attack corpus (tests/attack_corpus.py), and on an
image right at the default pixel limit: peak RSS (ru_maxrss) added to a fresh process.

    PYTHONPATH=. python bench/attack.py

Each row runs in its own process (a peak cannot be reset within one); the figure is what
``jobs.images.decode_image`` adds on top of Python + PIL + numpy, for a gray 16-px model (as the
scoring job calls it: JPEG DCT scaling on, luma only).
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.attack_corpus import huge_gif, huge_jpeg, huge_png
from tests.test_attack_input import bomb_memory


def at_limit_png(side: int = 8000) -> bytes:
    """A real PNG of side x side gray pixels (64M at 8000: the default --max-pixels), all zero:
    a few hundred kB that decode to 64 MB."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    rows = {
        "PNG declaring 100000x100000": huge_png(),
        "GIF declaring 65535x65535": huge_gif(),
        "JPEG declaring 20000x20000": huge_jpeg(),
        "real PNG 8000x8000 (at the 64M limit)": at_limit_png(),
    }
    print(f"{'input':40} {'bytes':>10} {'peak MiB added':>15}  outcome")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in rows.items():
            m = bomb_memory(data, Path(tmp) / "x")
            print(f"{name:40} {len(data):>10} {m['mib']:>15.1f}  {m['error'] or 'decoded'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
