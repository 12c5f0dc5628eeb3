"""Decoding's peak memory, measured in a new process (the rest of images.py is in tests/unit/formats/test_images.py)."""

import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

_PEAK_SCRIPT = """
import sys
from spade_batch.formats.images import decode_for_model, decode_image

def status_mib(field):
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024

data = open(sys.argv[1], "rb").read()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM, the peak resident set, to the current one
before = status_mib("VmRSS")
if sys.argv[2] == "full":
    decode_image(data, "big.jpg")
else:
    decode_for_model(data, "big.jpg", min_side=256)
print(status_mib("VmHWM") - before)
"""


def test_peak_memory_of_a_large_jpeg_is_bounded_by_the_working_size(tmp_path):
    path = tmp_path / "big.jpg"
    width, height = 8000, 6000  # 48 megapixels: 144 MiB as RGB
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    Image.fromarray(np.broadcast_to(ramp[None, :, None], (height, width, 3)).copy()).save(path, quality=80)

    def peak_mib(how: str) -> float:
        env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[3])}
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path), how], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    assert peak_mib("reduced") < 30
    assert peak_mib("full") > 140  # the measurement sees a full decode
