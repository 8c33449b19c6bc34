"""What one ``agcnn predict`` run is asked to do: :class:`PredictOptions`, checked before any work."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

# UsageError: a problem with the command line or the folders, found before any work (exit 2).
from agcnn.config import EXPLAIN_METHODS, valid_device
from agcnn.errors import UsageError


@dataclass
class PredictOptions:
    """Every option of a predict run; the command line maps onto it one to one."""

    checkpoint: str | os.PathLike[str]
    input: str | os.PathLike[str]
    output: str | os.PathLike[str]
    device: str = "auto"
    batch_size: int = 32
    workers: int = 0
    overlays: bool = False
    # Overlay maps: "cam" or "gradcam" (agcnn.explain); which findings: the top k by probability,
    # or None for those called positive at the checkpoint's operating points (see agcnn.overlays).
    explain: str = "cam"
    overlay_top: int | None = None
    include_identifiers: bool = False
    all_branches: bool = False
    shard: tuple[int, int] | None = None  # (K, N); None: all files, or RANK / WORLD_SIZE under torchrun
    progress: bool = True
    # Scope (agcnn.data.scope): predict other body parts / non-frontal views too.
    any_body_part: bool = False
    any_view: bool = False
    # On resume, process the files whose rows are "failed" again, replacing those rows.
    retry_failed: bool = False
    # Folder for the DICOM results (SR + Secondary Capture per predicted DICOM instance).
    dicom_out: str | os.PathLike[str] | None = None
    # At most this many files in this run, the rest left for the next (agcnn serve predicts a
    # backlog in chunks, forwarding each chunk's results before the next); None: all.
    limit: int | None = None

    # The options that change what a row holds: a resumed run must use the same ones.
    ROW_OPTIONS = ("include_identifiers", "all_branches", "overlays", "any_body_part", "any_view", "dicom_out")

    def check(self) -> PredictOptions:
        """Raise :class:`UsageError` for what needs nothing written; fill ``shard`` from torchrun."""
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size} must be at least 1")
        if self.explain not in EXPLAIN_METHODS:
            raise UsageError(f"--explain {self.explain!r} is not a method; use {' or '.join(EXPLAIN_METHODS)}")
        if not valid_device(self.device):
            raise UsageError(f"--device={self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        if self.overlay_top is not None and self.overlay_top < 0:
            raise UsageError(f"--overlay-top {self.overlay_top} must be 0 (the findings called positive) or more")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"limit {self.limit} must be at least 1 file, or None for all")
        if self.workers < 0:
            raise UsageError(f"--workers {self.workers} must be 0 or more")
        in_dir = Path(self.input)
        if not in_dir.exists():
            raise UsageError(f"--input {str(in_dir)!r} does not exist; pass the folder holding the images")
        if not in_dir.is_dir():
            raise UsageError(f"--input {str(in_dir)!r} is a file; pass the folder that holds it")
        if not os.access(in_dir, os.R_OK | os.X_OK):
            raise UsageError(f"--input {str(in_dir)!r} cannot be listed (permission denied); give this user read access")
        out_top = Path(self.output)
        if out_top.exists() and out_top.resolve() == in_dir.resolve():
            raise UsageError(f"--output {str(out_top)!r} is the input folder; pass a separate folder (it may lie inside the input)")
        if self.dicom_out is not None:
            dicom_out = Path(self.dicom_out)
            if dicom_out.exists() and not dicom_out.is_dir():
                raise UsageError(f"--dicom-out {str(dicom_out)!r} exists and is not a folder; pass a folder path")
            if dicom_out.exists() and dicom_out.resolve() == in_dir.resolve():
                raise UsageError(f"--dicom-out {str(dicom_out)!r} is the input folder; pass a separate folder")
        if self.shard is None:
            self.shard = shard_from_env()
        return self

    def row_options(self) -> dict[str, bool]:
        # A flag each: whether --dicom-out was given matters to a resumed run, not where.
        return {name: bool(getattr(self, name)) for name in self.ROW_OPTIONS}

    def scope(self):
        """The :class:`agcnn.data.scope.ScopePolicy` of this run."""
        from agcnn.data.scope import ScopePolicy

        return ScopePolicy(any_body_part=self.any_body_part, any_view=self.any_view)

    def out_dir(self) -> Path:
        """The folder this run writes: ``--output``, or its ``shard-K-of-N`` subfolder."""
        top = Path(self.output)
        return top / f"shard-{self.shard[0]}-of-{self.shard[1]}" if self.shard else top


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``; an argparse type (errors exit 2)."""
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r} is not of the form K/N, e.g. 0/4 (shares are numbered from 0)") from None
    if n < 1 or not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: K must be in 0..N-1 and N at least 1, e.g. 0/4 ... 3/4")
    return k, n


def shard_from_env() -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` when started by torchrun with more than one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise UsageError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} are not integers") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({world - 1})")
    return rank, world
