"""The output folder of a run: what a run writes there, refusing to mix two runs, and metrics.jsonl.

A folder holds one run. A new run into a folder that holds an earlier one stops before any work
unless it continues it (`resume`) or replaces it (`overwrite`, which deletes only the run files
below, and only from a folder that holds nothing else).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import atomic_write

#: what a run writes into its output folder
RUN_FILES = ("run_config.yaml", "metrics.jsonl", "summary.json", "checkpoint", "best", "adapter", "model")
#: what a killed run can leave beside them: the directories save_checkpoint swaps
RUN_LEFTOVERS = (".checkpoint-tmp", ".checkpoint-old")


def _is_run_file(name: str) -> bool:
    if name in RUN_FILES or name in RUN_LEFTOVERS:
        return True
    # atomic_write's temporary files: ".<target name>.<random>.tmp"
    return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES)


def check_output_dir(out: Path, flag: str = "--output-dir") -> None:
    """Fail before any work when `out` cannot be a writable directory (`flag`: the option that named it).

    Raises:
        ConfigError: `out` (or a folder above it) is a file, or cannot be written.
    """
    probe = out
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        what = "is" if probe == out else f"lies under {probe}, which is"
        raise ConfigError(f"The output directory {out} {what} a file, not a directory. Pass {flag} with a "
                          "directory (new or existing).")
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"The output directory {out} is not writable (no write permission on {probe}). "
                          f"Pass {flag} with a directory you can write to.")


def earlier_run(out: Path) -> list[str]:
    """The run files (and leftovers of a killed run) that `out` holds, sorted; [] for a new folder."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if _is_run_file(p.name))


def plan_output_dir(out: Path, resume: bool, overwrite: bool) -> list[Path]:
    """Check that a run may write into `out`; returns the paths `overwrite` deletes first (else []).

    Touches nothing, so every process of a run can call it before one of them deletes.

    Raises:
        ConfigError: `out` holds an earlier run and neither `resume` nor `overwrite` is set; both are
            set; or `overwrite` is set and `out` holds files a run does not write, or does not look
            like a run (no run_config.yaml).
    """
    check_output_dir(out)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --output-dir and --overwrite deletes it: pass one of them.")
    found = earlier_run(out)
    if not found or resume:
        return []
    listed = ", ".join(found)
    if not overwrite:
        raise ConfigError(
            f"The output directory {out} holds an earlier run ({listed}). Pass --resume to continue it from its "
            "checkpoint, or --overwrite to delete its run files and start afresh; or pick a new --output-dir.")
    others = sorted(p.name for p in out.iterdir() if not _is_run_file(p.name))
    if others:
        raise ConfigError(
            f"--overwrite deletes only the files a lorakit run writes, but {out} also holds "
            f"{', '.join(others[:5])}{' ...' if len(others) > 5 else ''}. Move them away, or pick a new --output-dir.")
    if "run_config.yaml" not in found:
        raise ConfigError(
            f"--overwrite: {out} holds {listed} but no run_config.yaml, so it is not the folder of a lorakit run; "
            "nothing was deleted. Remove those files yourself, or pick a new --output-dir.")
    return [out / name for name in found]


def delete(paths: list[Path]) -> None:
    """Delete run files: folders with their contents, files and links as themselves (a link is not followed)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class MetricsLog:
    """metrics.jsonl: one JSON object per line, one line per log or eval event.

    Opened with `resume_step`, it first drops the records of steps after it (the resumed run writes
    them again) and a last line cut short by a kill, so each step appears once.
    Only the process that writes files opens it (`enabled`); for the others it does nothing.
    """

    def __init__(self, path: Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.path = path
        self._file = None
        if not enabled:
            return
        if resume_step is not None and path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a record cut short by a kill
                if isinstance(event, dict) and int(event.get("step", 0)) <= resume_step:
                    kept.append(line + "\n")
            atomic_write(path, lambda f: Path(f).write_text("".join(kept)))
        self._file = open(path, "a")  # noqa: SIM115 (open for the whole run; close() closes it)

    def write(self, event: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(event) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
