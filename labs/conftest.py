"""nbval over labs/.

- A notebook that is not a lab (no kclub metadata, say a reader's Untitled.ipynb) is not
  collected, so it cannot fail `make test`.
- Each lab nbval runs is also saved, executed, to build/<slug>/<slug>.ipynb (what `kclub run`
  writes), so `make site` after `make test` shows this run's outputs instead of running every
  lab a second time.
"""

from pathlib import Path

from shared.labs import kclub_metadata


def pytest_ignore_collect(collection_path: Path, config):
    if collection_path.suffix == ".ipynb" and kclub_metadata(collection_path) is None:
        return True
    return None


def pytest_runtest_teardown(item, nextitem):
    """After each nbval cell: its outputs go into the notebook nbval read; after the notebook's
    last cell, that notebook is written out executed."""
    outputs = getattr(item, "test_outputs", None)
    cell = getattr(item, "cell", None)
    if cell is None or outputs is None or item.path.suffix != ".ipynb":
        return
    cell.outputs = list(outputs)
    cell.execution_count = item.cell_num + 1
    if nextitem is None or nextitem.parent is not item.parent:
        import nbformat

        from shared.site import executed_notebook

        path = executed_notebook(item.path.stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(item.parent.nb, path)
