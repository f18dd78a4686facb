"""Which adapters a server knows, which it holds read in host memory, and which sit in the model.

Three tiers, each bounded except the first:
    known      name -> folder (from --adapter NAME=DIR, /v1/load_lora_adapter, or a `model` that names a
               folder under --adapter-dir)
    read       an LRU of checked adapters in host memory (`max_cpu_bytes` of factors): reading and checking a folder is
               the slow part, and happens on the request's thread, not the engine's
    on device  an LRU of adapters injected into the served model (`max_loaded`), each under a slot name
               of its own; one not used by a running row makes room when another is needed

Everything that changes the model (`acquire`, `collect`) runs on the engine's thread between steps;
the rest may run on any thread.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from torch import nn

from ..errors import AdapterFileError, AdapterNotFoundError, ConfigError, LoraError
from ..compat import vllm_problems

log = logging.getLogger("lorakit.serve")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")


class ForbiddenPath(ConfigError):
    """An adapter path outside --adapter-dir, or a load by path on a server started without one."""


def confined(root: Path | None, path: str) -> Path:
    """`path` (relative to `root`, or absolute inside it) resolved, links followed, if it stays inside `root`.

    Raises:
        ForbiddenPath: no root, a `..` component, or a path that resolves outside `root` (symlinks included).
    """
    if root is None:
        raise ForbiddenPath("this server loads adapters by path only from --adapter-dir, and none was given; "
                            "restart it with --adapter-dir DIR, or name adapters with --adapter NAME=DIR.")
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ForbiddenPath(f"adapter path {path!r} is not a path.")
    p = Path(path)
    if ".." in p.parts:
        raise ForbiddenPath(f"adapter path {path!r} contains '..'; give a folder inside --adapter-dir.")
    real_root = root.resolve()
    target = (p if p.is_absolute() else real_root / p).resolve()
    if not target.is_relative_to(real_root):
        raise ForbiddenPath(f"adapter path {path!r} is outside --adapter-dir ({root}); adapters load only from "
                            "folders inside it.")
    return target


class AdapterRegistry:
    """The adapters of one served model (see the module docstring).

    Args:
        model: the served model; adapters are injected into it under slot names `serve-<n>`.
        adapter_dir: the only folder that adapters may be loaded from by path or discovered in (None: none).
        max_loaded: adapters held in the model at once.
        max_cpu_bytes: bytes of adapter factors held read in host memory (the newest adapter is kept whatever
            its size).
    """

    def __init__(self, model: nn.Module, adapter_dir: str | os.PathLike | None = None, max_loaded: int = 8,
                 max_cpu_bytes: int = 4 << 30) -> None:
        if max_loaded < 1 or max_cpu_bytes < 1:
            raise ConfigError(f"max_loaded={max_loaded}, max_cpu_bytes={max_cpu_bytes}: each must be at least 1.")
        self.model = model
        self.root = Path(adapter_dir) if adapter_dir is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ConfigError(f"--adapter-dir {adapter_dir} is not a folder.")
        self.max_loaded, self.max_cpu_bytes = max_loaded, max_cpu_bytes
        self.read_bytes = 0
        self.known: dict[str, Path] = {}
        self.read: OrderedDict[str, object] = OrderedDict()      # name -> checked plan (lorakit.io)
        self.device: OrderedDict[str, str] = OrderedDict()       # name -> slot name in the model
        self.warnings: dict[str, list[str]] = {}
        self._gone: list[str] = []  # slots of unloaded adapters, removed from the model by `collect`
        self._slots = 0
        self.version = 0  # moves whenever an adapter enters or leaves the model
        self._lock = threading.RLock()

    # -- any thread ------------------------------------------------------------------------------------
    def add(self, name: str, path: str | os.PathLike, confine: bool = True) -> list[str]:
        """Know adapter `name` at `path` (inside --adapter-dir when `confine`), read and check it now.
        Returns the ways the folder breaks vLLM's loading rules (also logged).

        Raises:
            ConfigError: a bad or taken name; ForbiddenPath: a path outside --adapter-dir.
            AdapterFileError, ShapeMismatchError: the folder holds no adapter for this model, or one that
                changes weights that every row shares.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
            raise ConfigError(f"adapter name {name!r}: use letters, digits, '.', '_', '-' and '/'.")
        folder = confined(self.root, str(path)) if confine else Path(path)
        with self._lock:
            if name in self.known:
                raise ConfigError(f"an adapter named {name!r} is already loaded; unload it first, or pick "
                                  "another name.")
        plan = self._plan(name, folder)
        problems = vllm_problems(folder)
        for p in problems:
            log.warning("adapter %s: %s", name, p)
        with self._lock:
            if name in self.known:
                raise ConfigError(f"an adapter named {name!r} is already loaded; unload it first.")
            self.known[name] = folder
            self.warnings[name] = problems
            self._keep_read(name, plan)
        return problems

    def resolve(self, name: str) -> bool:
        """Whether `name` is an adapter: a known one, or a folder under --adapter-dir (then added: loading on
        first use). False for names that are neither.

        Raises:
            as `add`, for a folder under --adapter-dir that does not load.
        """
        with self._lock:
            if name in self.known:
                if name not in self.read:
                    self._keep_read(name, self._plan(name, self.known[name]))
                else:
                    self.read.move_to_end(name)
                return True
        if self.root is None or not _NAME.fullmatch(name) or ".." in name:
            return False
        try:
            folder = confined(self.root, name)
        except ForbiddenPath:
            return False
        if not (folder / "adapter_config.json").is_file():
            return False
        try:
            self.add(name, name)
        except ConfigError:
            if name not in self.known:  # a race with another request adding it is fine
                raise
        return True

    def remove(self, name: str) -> None:
        """Forget adapter `name`; it leaves the model once no running row uses it.

        Raises:
            AdapterNotFoundError: no adapter of that name.
        """
        with self._lock:
            if name not in self.known:
                raise AdapterNotFoundError(f"no adapter named {name!r} is loaded (loaded: {sorted(self.known)}).")
            del self.known[name]
            if name in self.read:
                self.read_bytes -= _nbytes(self.read.pop(name))
            self.warnings.pop(name, None)
            slot = self.device.pop(name, None)
            if slot is not None:
                self._gone.append(slot)

    def pending(self) -> bool:
        """Whether unloaded adapters still sit in the model (`collect` removes them)."""
        return bool(self._gone)

    def names(self) -> list[str]:
        with self._lock:
            return list(self.known)

    # -- the engine's thread -----------------------------------------------------------------------------
    def acquire(self, name: str, busy: set[str]) -> str | None:
        """The slot name of adapter `name` in the model, injecting it (and removing the least recently used
        adapter no running row uses, in `busy` slots) when needed; None when every slot is busy.

        Raises:
            AdapterNotFoundError: the adapter was unloaded meanwhile.
            AdapterFileError, ShapeMismatchError: its folder no longer loads.
        """
        from ..inject import delete_adapter
        from ..io import install_plan

        with self._lock:
            if name not in self.known:
                raise AdapterNotFoundError(f"adapter {name!r} was unloaded.")
            if name in self.device:
                self.device.move_to_end(name)
                return self.device[name]
            if len(self.device) >= self.max_loaded:
                idle = [n for n, slot in self.device.items() if slot not in busy]
                if not idle:
                    return None
                delete_adapter(self.model, self.device.pop(idle[0]))
                self.version += 1
            plan = self.read.get(name)
            folder = self.known[name]
        if plan is None:
            plan = self._plan(name, folder)
        self._slots += 1
        slot = f"serve-{self._slots}"
        install_plan(self.model, plan, slot)
        self.version += 1
        with self._lock:
            if name not in self.known:  # unloaded while it was installed
                self._gone.append(slot)
                raise AdapterNotFoundError(f"adapter {name!r} was unloaded.")
            self.device[name] = slot
            self._keep_read(name, plan)
        return slot

    def collect(self, busy: set[str]) -> None:
        """Remove from the model the slots of unloaded adapters that no running row uses."""
        from ..inject import delete_adapter

        with self._lock:
            free = [s for s in self._gone if s not in busy]
            self._gone = [s for s in self._gone if s in busy]
        for slot in free:
            delete_adapter(self.model, slot)
            self.version += 1

    # -- inside ---------------------------------------------------------------------------------------------
    def _keep_read(self, name: str, plan) -> None:
        if name not in self.read:
            self.read_bytes += _nbytes(plan)
        self.read[name] = plan
        self.read.move_to_end(name)
        while self.read_bytes > self.max_cpu_bytes and len(self.read) > 1:
            self.read_bytes -= _nbytes(self.read.popitem(last=False)[1])

    def _plan(self, name: str, folder: Path):
        """The checked adapter of `folder`, ready to inject (lorakit.io's own plan, as `load_adapter` makes it).

        Raises:
            AdapterFileError: not an adapter, a DoRA adapter, or one that changes shared base weights.
        """
        from ..io import plan_adapter

        if not folder.is_dir():
            raise AdapterFileError(f"adapter {name!r}: {folder} is not a folder.")
        if any("DoRA" in problem for problem in vllm_problems(folder)):
            raise AdapterFileError(f"adapter {name!r} ({folder}) is a DoRA adapter, which lorakit serve does not route "
                                   "per row; merge it into its base (`lorakit merge`) and serve that model instead.")
        try:
            plan = plan_adapter(self.model, folder)
        except LoraError:
            raise
        except Exception as exc:  # whatever else a damaged or hostile file provokes
            raise AdapterFileError(f"adapter {name!r} ({folder}) could not be read ({type(exc).__name__}: "
                                   f"{str(exc)[:200]}); it is damaged or not an adapter.") from exc
        if plan.extra or plan.init == "pissa":
            what = "base weights it trained (modules_to_save or biases)" if plan.extra else "a PiSSA residual"
            raise AdapterFileError(
                f"adapter {name!r} ({folder}) carries {what}, which every row of a mixed batch shares, so it "
                "cannot be served beside other adapters. Merge it into its base (`lorakit merge`) and serve "
                "that model instead.")
        return plan


def _nbytes(plan) -> int:
    """Bytes of the factors a checked adapter holds."""
    return sum(t.numel() * t.element_size() for m in plan.modules.values() for t in (m.A, m.B))
