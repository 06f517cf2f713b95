"""Where the repository is, for tests at any depth of the tests tree (``from repo_paths import REPO``)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
