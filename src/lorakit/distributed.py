"""Training on several processes with torch.distributed: DDP and FSDP2, behind one small `Context`.

Launch with `lorakit train --nproc N ...`, which re-launches the same command through
`torch.distributed.run` (torchrun's own code), or with `torchrun --nproc-per-node N -m lorakit --
train ...` (the `--` stops torchrun from reading lorakit's flags: it would take `--r` for an
abbreviation of its own `--rdzv-*` options).
`setup()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), joins the process
group (nccl on CUDA, gloo on CPU) and returns the `Context` that the training loop asks for
everything that differs between one and several processes:

    strategy "none"  one process: every method does what single-process training always did.
    strategy "ddp"   DistributedDataParallel: each rank holds the whole model, gradients of the
                     trainable (LoRA) parameters are averaged. For models that fit one GPU.
    strategy "fsdp"  FSDP2 (`fully_shard` on every decoder layer, then the root): the frozen base
                     and the adapters are sharded across ranks and gathered layer by layer.
                     Frozen and trainable parameters mix freely in one shard group, because FSDP2
                     shards each parameter on its own (only parameters with gradients are
                     reduce-scattered), so no wrap policy has to separate them.

What stays the same for any number of processes, so runs compare and resume across world sizes:
- Data: the global batch of step k is the single-process batch k of size
  `batch_size * world_size` (see `LengthGroupedBatchSampler`); each rank takes one slice.
  Gradients are the mean of the ranks' mean losses, which is the global mean when every
  example has the same number of loss tokens (otherwise a weighting of the same data).
- Files: checkpoints and adapters are written by rank 0 from full (gathered, unsharded)
  tensors, in exactly the single-process format: `trainable.safetensors` keyed by parameter
  name, the optimizer state as `optimizer.state_dict()` of one process would hold it, and a
  PEFT adapter directory. Every rank then waits at a barrier.
- Evaluation runs on every rank over the whole held-out set (FSDP's forward is a collective,
  so all ranks must run it); the ranks get identical results and rank 0 records them.
- RNG: every rank seeds with the same seed (the LoRA init must match across ranks, as in
  single-process training); checkpoints keep rank 0's generator state and every rank
  restores it. Dropout masks therefore repeat across ranks, as with the common practice of
  one seed for all data-parallel ranks.
- Only rank 0 prints, draws the progress bar and writes metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError

STRATEGIES = ("auto", "ddp", "fsdp")
#: the environment torchrun gives each process
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """True in a process started by torchrun (or `lorakit train --nproc`)."""
    return all(v in os.environ for v in LAUNCH_VARS)


def env_rank() -> int:
    """This process's global rank from torchrun's environment (0 when not launched by it)."""
    return int(os.environ.get("RANK", 0))


@dataclasses.dataclass
class Context:
    """Who this process is and how the model is split. `Context()` is plain single-process training."""

    strategy: str = "none"
    """"none", "ddp" or "fsdp"."""
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"))
    owns_group: bool = False
    """True when `setup` created the process group (and `close` destroys it)."""

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives ------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank (a collective, and a barrier: every rank must call it).

        Lets the other ranks stop with rank 0 when its write fails, instead of waiting for it.
        """
        if not self.distributed:
            return ok
        import torch.distributed as dist
        t = torch.tensor([0.0 if ok else 1.0], device=self.device)
        dist.all_reduce(t)
        return float(t[0]) == 0.0

    def step_stats(self, loss_sum: float, tokens: int) -> tuple[float, int]:
        """(mean of the ranks' losses, total tokens) for one optimizer step; identity on one process.

        Every rank gets the same numbers, so a non-finite loss stops all ranks together.
        """
        if not self.distributed:
            return loss_sum, tokens
        import torch.distributed as dist
        t = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0]) / self.world_size, int(t[1])

    # -- the model --------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, bf16: bool = False) -> nn.Module:
        """Prepare `model` (LoRA already injected, base frozen) for data-parallel training.

        Returns the module to call in training: a DistributedDataParallel wrapper for "ddp"
        (`model` itself stays the plain model, for evaluation and saving), `model` itself for
        "fsdp" (FSDP2 shards it in place; its parameters become DTensors, so build the optimizer
        afterwards) and for "none". With `bf16`, FSDP gathers parameters in bfloat16 and reduces
        gradients in float32.

        Raises:
            ConfigError: the model has no trainable parameter (DDP refuses such a model).
        """
        if self.strategy == "none":
            return model
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("Nothing to train: the model has no trainable parameter (check --targets).")
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            # a quantized base's packed integer weights (bitsandbytes) are loaded alike on every rank and never
            # change: DDP leaves them out of its start-up broadcast
            packed = [n for n, p in model.named_parameters() if not (p.is_floating_point() or p.is_complex())]
            if packed:
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, packed)
            return DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)  # the rest: embeddings, final norm, head
        return model

    @contextlib.contextmanager
    def accumulating(self, train_model: nn.Module, sync: bool) -> Iterator[None]:
        """Run one micro-batch's backward; with `sync=False` skip the gradient all-reduce (the
        gradients add up locally and the last micro-batch of the step reduces them all)."""
        if self.strategy == "ddp" and not sync:
            with train_model.no_sync():
                yield
        elif self.strategy == "fsdp":
            train_model.set_requires_gradient_sync(sync)
            yield
        else:
            yield

    # -- state: gather to rank 0, load on every rank -----------------------------------------------
    def trainable_state(self, model: nn.Module) -> dict[str, Tensor]:
        """Full CPU copies of the trainable parameters by name; on ranks > 0 of "fsdp" an empty dict.

        A collective under "fsdp": every rank must call it.
        """
        if self.strategy != "fsdp":
            return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        state = get_model_state_dict(model, options=self._full_options(ignore_frozen_params=True))
        return {n: t.contiguous() for n, t in state.items()}

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state as one process's `optimizer.state_dict()` holds it (parameter
        indices as keys, full tensors); on ranks > 0 of "fsdp" the state part is empty.

        A collective under "fsdp": every rank must call it.
        """
        local = optimizer.state_dict()
        if self.strategy != "fsdp":
            return local
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        full = get_optimizer_state_dict(model, optimizer, options=self._full_options())
        index = {name: i for i, name in enumerate(_optimizer_param_names(model, optimizer))}
        # param_groups (hyperparameters, index lists) are the same on every rank: take the local ones
        return {"state": {index[name]: s for name, s in full.get("state", {}).items()},
                "param_groups": local["param_groups"]}

    def load_trainable(self, model: nn.Module, weights: dict[str, Tensor]) -> None:
        """Copy full tensors (every rank passes the same dict) into the trainable parameters."""
        if self.strategy != "fsdp":
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, t in weights.items():
                    params[n].copy_(t)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        # set_model_state_dict replaces the dict's values with shards: give it its own dict
        set_model_state_dict(model, dict(weights), options=StateDictOptions(full_state_dict=True, strict=False))

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load what `optimizer_state` returned (from any world size) into every rank's optimizer."""
        if self.strategy != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        names = _optimizer_param_names(model, optimizer)
        groups = []
        for group in state["param_groups"]:
            groups.append({**group, "params": [names[i] for i in group["params"]]})
        by_name = {"state": {names[i]: dict(s) for i, s in state["state"].items()}, "param_groups": groups}
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def _full_options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)

    # -- files --------------------------------------------------------------------------------------
    def save_adapter(self, model: nn.Module, path: str | os.PathLike, name: str = "default") -> None:
        """`lorakit.save_adapter` for any strategy: rank 0 writes the directory from full tensors,
        byte-for-byte what one process writes; every rank then waits at a barrier.

        A collective under "fsdp" and "ddp": every rank must call it.

        Raises:
            DiskFullError: the disk is full (the adapter's earlier files, if any, are untouched).
        """
        from .errors import LoraError
        from .io import save_adapter
        from .train.checkpoints import disk_full, disk_full_error
        state = self.trainable_state(model) if self.strategy == "fsdp" else None
        error = None
        if self.is_main:
            try:
                if state is not None:
                    with materialized(model, state):
                        save_adapter(model, path, name=name)
                else:
                    save_adapter(model, path, name=name)
            except Exception as exc:
                error = exc
        if not self.all_ok(error is None):  # (the other ranks stop with rank 0 rather than wait for it)
            if error is None:
                raise LoraError(f"Rank 0 could not write the adapter to {path}; its error says why.")
            if disk_full(error):
                raise disk_full_error(path, "the adapter", error) from error
            raise error

    def save_pretrained(self, model: nn.Module, tokenizer, path: str | os.PathLike) -> None:
        """`model.save_pretrained` + the tokenizer (full fine-tuning), written by rank 0, then a barrier."""
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_model_state_dict
            state = get_model_state_dict(model, options=self._full_options())
            if self.is_main:
                with materialized(model, {}):
                    model.save_pretrained(str(path), state_dict=state)
        elif self.is_main:
            model.save_pretrained(str(path))
        if self.is_main:
            tokenizer.save_pretrained(str(path))
        self.barrier()

    def close(self) -> None:
        """Leave the process group if `setup` joined it."""
        if self.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def setup(strategy: str = "auto") -> Context:
    """The `Context` of this process; joins torchrun's process group when launched by torchrun.

    Not launched: single-process training (strategy "auto"). Launched (even with one process):
    "auto" means "ddp". The backend is nccl when CUDA is available (one GPU per process, by
    LOCAL_RANK), else gloo on the CPU. A process group that already exists is used as it is.

    Raises:
        ConfigError: an unknown strategy; "ddp"/"fsdp" in a process that torchrun did not start;
            torch built without torch.distributed; more processes on a node than it has GPUs.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if not launched():
        if strategy != "auto":
            raise ConfigError(
                f"--strategy {strategy} splits training over several processes, but this process was not "
                "started by a launcher. Run `lorakit train --nproc N ...` or `torchrun --nproc-per-node N -m "
                "lorakit train ...`; for one process, leave --strategy at auto.")
        return Context()
    import torch.distributed as dist
    if not dist.is_available():
        raise ConfigError(f"--strategy {strategy} needs torch.distributed, which this PyTorch build "
                          f"({torch.__version__}) lacks. Install a PyTorch build with distributed support.")
    rank, world, local = (int(os.environ[v]) for v in LAUNCH_VARS)
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if local >= gpus:
            raise ConfigError(
                f"Process {rank} has local rank {local}, but this machine has only {gpus} GPU(s): nccl needs one "
                f"GPU per process. Launch at most {gpus} processes per node (--nproc {gpus}), or hide the GPUs "
                "(CUDA_VISIBLE_DEVICES=) to train on the CPU with gloo.")
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    owns = not dist.is_initialized()
    if owns:
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, **kwargs)
    return Context(strategy="ddp" if strategy == "auto" else strategy, world_size=dist.get_world_size(),
                   rank=dist.get_rank(), local_rank=local, device=device, owns_group=owns)


def launch(argv: list[str], nproc: int) -> int:
    """Run `lorakit <argv>` on `nproc` processes of this machine through torchrun
    (`torch.distributed.run`, standalone rendezvous on a free port); returns the exit code.

    Raises:
        ConfigError: nproc < 1, or more processes than this machine has GPUs (nccl needs one each).
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}.")
    if not torch.distributed.is_available():
        raise ConfigError(f"--nproc needs torch.distributed, which this PyTorch build ({torch.__version__}) lacks.")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise ConfigError(
            f"--nproc {nproc} needs {nproc} GPUs (nccl runs one process per GPU), but this machine has {gpus}. "
            f"Use --nproc {gpus} or fewer, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU with gloo.")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "lorakit"])
    # Set apart, not parsed: torchrun's parser would read lorakit's `--r` as an abbreviation of its own --rdzv-*.
    args.training_script_args = list(argv)
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        print(f"lorakit: {len(codes)} of {nproc} processes failed (exit codes {codes}); see their output above.",
              file=sys.stderr)
        return next((c for c in codes if c and c > 0), 1)
    return 0


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules whose class Hugging Face lists in
    `_no_split_modules` (e.g. LlamaDecoderLayer), outermost only; otherwise the entries of the
    longest nn.ModuleList. Empty for a model with neither (FSDP then shards it as one unit)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found: list[tuple[str, nn.Module]] = []
    if names:
        for path, module in model.named_modules():
            if type(module).__name__ in names and not any(path.startswith(p + ".") for p, _ in found):
                found.append((path, module))
    if found:
        return [m for _, m in found]
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


@contextlib.contextmanager
def materialized(model: nn.Module, state: dict[str, Tensor]) -> Iterator[nn.Module]:
    """Temporarily put full tensors in place of the named (sharded) parameters, and give the root
    back its own class, so code written for a plain model (`save_adapter`, `save_pretrained`)
    sees one. FSDP2 subclasses the root as `FSDP<Class>`; the saved class name must not change.

    For rank 0 only, between steps: nothing may run forward inside the block. Everything is put
    back on exit.
    """
    from torch.distributed.fsdp import FSDPModule

    swapped: list[tuple[nn.Module, str, Any]] = []
    cls = type(model)
    plain = next((c for c in cls.__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule)), cls)
    try:
        for name, tensor in state.items():
            path, _, attr = name.rpartition(".")
            owner = model.get_submodule(path) if path else model
            swapped.append((owner, attr, owner._parameters[attr]))
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        model.__class__ = plain
        yield model
    finally:
        model.__class__ = cls
        for owner, attr, old in reversed(swapped):
            owner._parameters[attr] = old


def _optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order of the optimizer's flat index (the keys of its state_dict)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]

