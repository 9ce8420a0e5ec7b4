"""Write a folder under a temporary name next to its destination and swap it in only when complete.

At every moment the destination holds either the complete old output or the complete new one:

1. the new output is written into a staging folder beside the destination (same filesystem, so renames are atomic);
2. an existing destination is renamed aside (``.NAME.genieblue-old-PID-XXXX``), the staging folder renamed into its
   place, and only then the old one deleted. A failure between the two renames puts the old one back.

Staging and set-aside folders carry the writing process's id. SIGTERM raises ``KeyboardInterrupt`` inside the
block (Ctrl-C already does), so both are cleaned up as for any failure; a process killed outright (SIGKILL) leaves
them behind, and the next write to the same destination cleans up after processes that are no longer running: it
removes their staging folders and puts back a previous output one had set aside if the destination is empty.
"""

import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path


logger = logging.getLogger(__name__)

_MARK = "genieblue"


class OutputExistsError(FileExistsError):
    """The destination exists and may not be replaced."""

    def __init__(self, path):
        super().__init__(f"{path} already exists; pass overwrite=True to replace it")
        self.path = Path(path)


def refuse_existing(out_dir, overwrite):
    """Raise if ``out_dir`` exists and may not be replaced (call it before any slow work). Cleans up after
    interrupted writers first (``remove_stale``), so a previous output they had set aside counts as existing."""
    out_dir = Path(out_dir)
    remove_stale(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder; choose another output path")
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(out_dir)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out_dir):
    """Clean up after writers to ``out_dir`` that are no longer running (killed outright): their staging folders are
    removed; a previous output they had set aside is put back if nothing took its place, else removed."""
    out_dir = Path(out_dir)
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.{_MARK}-(staging|old)-(\d+)-")
    if not out_dir.parent.is_dir():
        return []
    removed = []
    for path in sorted(out_dir.parent.iterdir()):
        match = pattern.match(path.name)
        if not match or not path.is_dir() or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not out_dir.exists():
            os.replace(path, out_dir)
            logger.warning("restored %s, which an interrupted run had set aside", out_dir)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.info("removed %d unfinished folder(s) of an interrupted run: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


@contextmanager
def _sigterm_interrupts():
    """Turn SIGTERM into ``KeyboardInterrupt`` while the block runs (main thread only), so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sibling(out_dir, kind):
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{_MARK}-{kind}-{os.getpid()}-", dir=out_dir.parent))


def swap_in(staging, out_dir):
    """Move the complete ``staging`` folder to ``out_dir``; an existing ``out_dir`` is replaced only once the new one
    is in place (rename aside, rename in, delete), and restored if the second rename fails."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    aside = _sibling(out_dir, "old")
    os.rmdir(aside)  # only the unique name is wanted
    os.replace(out_dir, aside)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(aside, out_dir)
        raise
    try:
        shutil.rmtree(aside)
    except OSError as error:  # the new output is complete and in place; the old one could not be deleted
        logger.warning("the previous %s was replaced, but its old copy %s could not be deleted (%s)", out_dir, aside,
                       error)


@contextmanager
def atomic_output_dir(out_dir, overwrite=False):
    """Yield an empty staging folder; on success it replaces ``out_dir``, on any failure it is removed."""
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(out_dir, "staging")
    umask = os.umask(0)  # mkdtemp makes the folder private (0700); the output gets the usual permissions
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        with _sigterm_interrupts():
            yield staging
            swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
