"""What the bench scripts share: Hub and datasets offline (the data are local), this repository's `retrofit` on the
import path (the scripts run as files), and writing a report as JSON. Imported first: ``import common``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_json(path: str | Path, report: dict) -> None:
    """Write `report` to `path` (its folder made if needed) and say so."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
