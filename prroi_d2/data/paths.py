"""Where the datasets live: ``$PRROI_D2_DATASETS``, else ``~/.cache/prroi_d2/datasets`` (each dataset in a
versioned folder of its own below it)."""

import os

__all__ = ["default_datasets_root"]


def default_datasets_root():
    """``$PRROI_D2_DATASETS`` if set, else ``~/.cache/prroi_d2/datasets``."""
    return os.environ.get("PRROI_D2_DATASETS") or os.path.join(
        os.path.expanduser("~"), ".cache", "prroi_d2", "datasets"
    )
