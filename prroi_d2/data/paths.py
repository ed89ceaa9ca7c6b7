"""Where the datasets live: ``$PRROI_D2_DATASETS``, else ``~/.cache/prroi_d2/datasets`` (each dataset in a
versioned folder of its own below it)."""

import os

__all__ = ["default_datasets_root"]


def default_datasets_root():
    """``$PRROI_D2_DATASETS`` if set, else ``~/.cache/prroi_d2/datasets``. A path that is (or lies under) a file
    raises :class:`~prroi_d2.data.preflight.DatasetCheckError` naming the variable."""
    root = os.environ.get("PRROI_D2_DATASETS")
    if not root:
        return os.path.join(os.path.expanduser("~"), ".cache", "prroi_d2", "datasets")
    existing = os.path.abspath(root)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        from prroi_d2.data.preflight import DatasetCheckError  # the pre-flight check imports the loaders

        raise DatasetCheckError(
            f"PRROI_D2_DATASETS={root!r}: {existing} is a file, not a folder (point PRROI_D2_DATASETS at a folder "
            "for the generated datasets, or unset it for ~/.cache/prroi_d2/datasets)"
        )
    return root
