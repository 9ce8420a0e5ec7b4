"""Write a folder under a temporary name next to its destination and rename it only when complete."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def refuse_existing(out_dir, overwrite, error=FileExistsError):
    """Raise ``error`` if ``out_dir`` exists and may not be replaced (call it before any slow work)."""
    if Path(out_dir).exists() and not overwrite:
        raise error(f"{out_dir} already exists; pass --overwrite (overwrite=True) to replace it")


@contextmanager
def atomic_output_dir(out_dir, overwrite=False, error=FileExistsError):
    """Yield an empty staging folder; on success it replaces ``out_dir``, on any failure it is removed.

    The staging folder sits beside ``out_dir`` (same filesystem), so the final ``os.replace`` is a rename and a
    reader never sees a half-written ``out_dir``.
    """
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite, error)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)  # mkdtemp makes the folder private (0700); the output gets the usual permissions
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
