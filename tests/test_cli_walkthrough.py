"""The README's walk-through from a clean digit to a restored one, run verbatim: each line of its bash block
through the ``diffsolve`` entry point, in a fresh folder, with the shipped ``digits16`` model."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffsolve.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "### Walk-through: from a clean digit to a restored one"


def walkthrough_commands() -> list[str]:
    section = README.read_text().split(HEADING, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_walkthrough_runs_verbatim(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = walkthrough_commands()
    assert len(commands) >= 3 and all(c.startswith("diffsolve ") for c in commands)
    outputs = []
    for line in commands:
        assert main(shlex.split(line)[1:]) == 0, line
        outputs.append(capsys.readouterr().out)
    for name in ("clean.png", "measured.png", "restored.png", "seven.png", "seven_box.png", "seven_restored.png"):
        assert (tmp_path / name).is_file(), name
    assert np.asarray(Image.open("clean.png")).shape == (16, 16)  # a digit, not a grid with a border
    assert np.asarray(Image.open("seven.png")).shape == (16, 16)
    # each restoration beats the pseudo-inverse of its measurement (what the README promises for every task)
    for out in outputs:
        if "PSNR" in out:
            ours, pinv = (float(v) for v in re.findall(r"PSNR (-?\d+\.\d+) dB", out))
            assert ours > pinv + 3, out
