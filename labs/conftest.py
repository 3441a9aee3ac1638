"""nbval over labs/: a notebook that is not a lab (no kclub metadata, say a reader's
Untitled.ipynb) is not collected, so it cannot fail `make test`."""

from pathlib import Path

from shared.labs import kclub_metadata


def pytest_ignore_collect(collection_path: Path, config):
    if collection_path.suffix == ".ipynb" and kclub_metadata(collection_path) is None:
        return True
    return None
