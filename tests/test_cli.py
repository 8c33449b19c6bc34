from __future__ import annotations

import subprocess
import sys

from agcnn import __version__
from agcnn.cli import main


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "agcnn", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"agcnn {__version__}"
    out = subprocess.run([sys.executable, "-m", "agcnn", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "evaluate", "predict", "demo", "prepare"):
        assert cmd in out.stdout


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
