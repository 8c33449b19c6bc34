"""What every stage of one ``agcnn train`` run shares: the config, the processes, the run folder,
where the stages start from, and where messages go."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agcnn.config import Config
from agcnn.runtime import Runtime


@dataclass
class TrainContext:
    """One run's settings, passed to each stage instead of a long argument list."""

    cfg: Config
    rt: Runtime
    run_dir: Path = Path(".")
    # Continue each stage from RUN_DIR/<stage>/last.pt where it exists.
    resume: bool = False
    # The checkpoint that seeds the (single) stage instead of RUN_DIR/<previous>/best.pt.
    seed_from: str | Path | None = None
    progress: bool = True
    # Messages for the user; on processes other than rank 0, one that drops them.
    say: Callable[[str], None] = print
    writer: Any = None  # TensorBoard SummaryWriter on rank 0, else None
    # The rows the data pre-check left out (data.skip_unreadable), stored in the checkpoints.
    left_out: list[dict[str, Any]] | None = None
    # The training / validation split record (agcnn.data.provenance), stored in the checkpoints.
    split: dict[str, Any] | None = None
