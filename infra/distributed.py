r"""train.py on several processes, started by torchrun (docs/distributed.md).

    torchrun --nproc_per_node 4 train.py --dataset cifar100 --arch resnet110
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint host:29500 \
        train.py ...

Nothing here changes a single process (a plain `python train.py`, or torchrun with one process):
every function below then does nothing but take the run-directory lock. Under torchrun the N
processes ("ranks"; N is the world size) train one run together:

- Batches. `--batch-size` stays the global batch B. Every rank draws the random numbers of each
  global batch (order, crops, flips) from the same (seed, epoch) generator exactly as one process
  draws them, and makes only its rows [rank * B/N, (rank + 1) * B/N) (data.train_batches, `part`),
  so the N slices together are the one-process batch, bit for bit.
- Student. Its training forward runs through DistributedDataParallel (DDP), which averages the
  gradients over the ranks during the backward pass. Every loss is a mean over the batch, so the
  averaged gradient is the gradient of the global batch's mean loss, and every rank takes the same
  optimizer step. The EMA of Eq. (5) keeps pairing the student's own (unwrapped) parameters.
- Teacher. Its initialisation (Sec. 3.3) runs on the full global batches on every rank, as in one
  process, and then rank 0's weights are broadcast, so that the ranks start from one teacher to the
  bit whatever their devices' arithmetic; Eq. (5) from identical students keeps it identical.
- BatchNorm. In training each rank normalises over its own B/N images (so N ranks are not
  bit-identical to one process), or with --sync-bn over the global batch (SyncBatchNorm; CUDA only;
  the trunk's per-view BatchNorm stays per view: ViewSyncBatchNorm2d). The running
  statistics are rank 0's, broadcast at the end of every epoch: the evaluation and the checkpoint
  see one model.
- Logging and evaluation. The epoch's sums are averaged over the ranks in one all-reduce; each rank
  evaluates its share of the test split (an empty one when the split is smaller than N) and the
  correct counts are summed.
- Files and messages. Rank 0 alone writes the run directory (rundir.writes_files), holds its lock
  (rundir.hold_run_dir) and prints. Every rank meets the same stops (bad input, a non-finite mean
  loss, and SIGTERM or SIGINT to any rank, on which the ranks agree: rundir.StopRequests), and the
  others end with rank 0's exit code without a word.
- Failures. torchrun stops every rank when one ends with an error, and prints its own report. A
  rank that dies breaks the others' collectives: on the CPU (gloo) rank 0 notices at once and says
  so in one line (exit code 5) before torchrun stops it; with NCCL the collectives wait, so
  torchrun's report, which names the rank, is the message. The run continues from its last
  finished epoch, which rank 0 saved once every rank had finished it, with --resume and the same
  world size (rundir.check_world_size).
"""
import contextlib
import datetime
import inspect
import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

import data
from infra.rundir import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_RANK_LOST, RunStopped, hold_run_dir
from models import PerViewStatistics, ViewBatchNorm2d

# How long a collective may wait for the other ranks before the run fails (our choice; torch's
# defaults are 10 minutes under NCCL, 30 under gloo). The longest wait is data_once_per_node's:
# the first download, extraction and caching of a data set by one process per node.
TIMEOUT = datetime.timedelta(minutes=60)


def part() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def session(args):
    """One process's whole run. Records the world size in `args` (config.json); under torchrun
    joins the process group and turns a broken collective into one line on rank 0; in every case
    rank 0 holds the run-directory lock. The other ranks leave the one-line messages to rank 0."""
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        with contextlib.ExitStack() as stack:
            if args.world_size > 1:
                join(args, rank, stack)
            lock(args, rank, stack)
            if args.world_size > 1:
                data_once_per_node(args)
            yield
    except (RunStopped, KeyboardInterrupt) as stop:
        if rank > 0:  # rank 0 prints the same stop
            raise SystemExit(getattr(stop, "exit_code", EXIT_INTERRUPTED)) from None
        raise
    except RuntimeError as error:  # a collective whose peer is gone (gloo raises at once)
        if args.world_size == 1 or not (isinstance(error, dist.DistError) or "gloo" in str(error)):
            raise
        if rank > 0:
            raise SystemExit(EXIT_RANK_LOST) from None
        reason = " ".join(str(error).split()).split("] ", 1)[-1][:150]  # one line, no source path
        raise RunStopped(f"another rank of this torchrun run stopped, so rank 0 cannot go on "
                         f"({reason}); every finished epoch is saved in {args.out_dir}: run the "
                         f"same torchrun command with --resume to continue",
                         EXIT_RANK_LOST) from None


def join(args, rank: int, stack: contextlib.ExitStack) -> None:
    """Check the flags that depend on N, and join torchrun's process group: NCCL on CUDA (each rank
    on the GPU of its LOCAL_RANK, refused in one line by a rank without one), gloo on the CPU. The
    other ranks' output is silenced (rank 0 prints the epoch lines, the progress bar and the
    summary); their crashes still show."""
    cuda = args.device.startswith("cuda")
    if args.batch_size % args.world_size:
        raise RunStopped(f"--batch-size {args.batch_size} is the global batch and must be "
                         f"divisible by the {args.world_size} processes of this torchrun run",
                         EXIT_BAD_INPUT)
    if args.sync_bn and not cuda:
        raise RunStopped("--sync-bn needs CUDA (torch's SyncBatchNorm runs on GPUs only)",
                         EXIT_BAD_INPUT)
    if cuda:
        local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= gpus:  # never rank 0, which leaves the messages to the others: say it here
            print(f"error: this torchrun run starts more processes on this machine than the {gpus} "
                  f"visible GPU(s) (LOCAL_RANK {local_rank}); give --nproc_per_node {gpus} or "
                  f"fewer, one process per GPU", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT)
        args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    stack.callback(dist.destroy_process_group)
    if rank > 0:
        devnull = stack.enter_context(open(os.devnull, "w"))
        stack.enter_context(contextlib.redirect_stdout(devnull))
        stack.enter_context(contextlib.redirect_stderr(devnull))


def lock(args, rank: int, stack: contextlib.ExitStack) -> None:
    """Rank 0 holds the run directory for the whole run (rundir.hold_run_dir) and tells the
    other ranks whether it got it; without it every rank stops (rank 0 says why)."""
    refused = None
    if rank == 0:
        try:
            stack.enter_context(hold_run_dir(args.out_dir, args.resume))
        except RunStopped as stop:
            refused = stop
    if args.world_size > 1:
        # NCCL sends CUDA tensors only.
        flag = torch.tensor(int(refused is not None), device=args.device)
        dist.broadcast(flag, 0)
        if flag.item() and refused is None:
            refused = RunStopped("rank 0 could not lock the run directory", EXIT_BAD_INPUT)
    if refused is not None:
        raise refused


def data_once_per_node(args) -> None:
    """One process per node (LOCAL_RANK 0) downloads, decodes and caches the data set while the
    others wait: torchvision's download and the caches of data.py are not safe for several writers
    at once. The others then find it ready (so this process loads it twice, once here)."""
    if os.environ["LOCAL_RANK"] == "0":
        try:
            data.load_data(args.dataset, args.data_dir, "cpu", seed=args.seed)
        except data.DataError as error:
            raise RunStopped(str(error), EXIT_BAD_INPUT) from None
    # A barrier that holds the process under NCCL as under gloo (torch's documentation of
    # dist.barrier); a collective such as all_reduce only queues work on the GPU under NCCL.
    device = torch.device(args.device)
    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


class TrainingForward(torch.nn.Module):
    """A method's trained modules as one module whose forward is the method's own training
    forward, so that DDP, which averages the gradients of a module's parameters, wraps it as is."""

    def __init__(self, modules: dict[str, torch.nn.Module], forward):
        super().__init__()
        self.trained = torch.nn.ModuleDict(modules)
        object.__setattr__(self, "run", forward)  # not a submodule, even when compiled

    def forward(self, *inputs):
        return self.run(*inputs)


def prepare(method, args) -> None:
    """After the start or the resumption, before the first step (nothing for one process): with
    --sync-bn synchronised BatchNorm in every network, rank 0's weights and statistics on every
    rank (the initialised teacher too), and the training forward under DDP."""
    if not dist.is_initialized():
        return
    modules = method.modules()
    if args.sync_bn:  # in place, keeping the parameters: the optimizer and Eq. (5) still hold them
        for module in modules.values():
            sync_batchnorm(module)  # per-view BatchNorm stays per view (ViewSyncBatchNorm2d)
    broadcast(t for module in modules.values() for t in (*module.parameters(), *module.buffers()))
    trained = {name: m for name, m in modules.items()
               if any(p.requires_grad for p in m.parameters())}
    device = torch.device(args.device)
    # The same forward, its gradients averaged over the ranks. Buffers are not broadcast at every
    # step: training reads no running statistic (end_of_epoch).
    method.training_forward = DistributedDataParallel(
        TrainingForward(trained, method.training_forward), **no_buffer_sync(),
        device_ids=[device] if device.type == "cuda" else None)


def no_buffer_sync() -> dict[str, bool]:
    """DDP's flag for "no buffer broadcast before each forward": forward_sync_buffers=False where
    DDP has it (torch 2.13 and 2.14 do, and warn on every run that broadcast_buffers is
    deprecated), broadcast_buffers=False in older releases. The new flag also broadcasts the
    buffers once at the start, a no-op here: `prepare` has just broadcast rank 0's."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class ViewSyncBatchNorm2d(PerViewStatistics, nn.SyncBatchNorm):
    """models.ViewBatchNorm2d over the processes of a torchrun run (--sync-bn): SyncBatchNorm's
    forward runs on each of the M view blocks, so that view m is normalised with the mean and
    variance of the view-m images of every rank, the global batch's B images as one process has
    them, and the running statistics get the M updates per step of one process. One
    synchronisation per view and layer (SyncBatchNorm needs CUDA). `views` is set by
    models.MultiPeerNet.run_trunk, as for ViewBatchNorm2d; the state dict is BatchNorm2d's."""


def sync_batchnorm(module: nn.Module) -> None:
    """Synchronise every BatchNorm inside `module` over the ranks (--sync-bn), in place: a
    ViewBatchNorm2d becomes a ViewSyncBatchNorm2d (per-view statistics of the global batch), any
    other BatchNorm a SyncBatchNorm. Each keeps its parameter and buffer objects, which the
    optimizer and the EMA of Eq. (5) hold, so the state-dict keys stay as well."""
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            kind = ViewSyncBatchNorm2d if isinstance(child, ViewBatchNorm2d) else nn.SyncBatchNorm
            synced = kind(child.num_features, child.eps, child.momentum, child.affine,
                          child.track_running_stats)
            synced.weight, synced.bias = child.weight, child.bias
            synced.running_mean, synced.running_var = child.running_mean, child.running_var
            synced.num_batches_tracked = child.num_batches_tracked
            setattr(module, name, synced.train(child.training))
        else:
            sync_batchnorm(child)


@torch.no_grad()
def broadcast(tensors) -> None:
    """Rank 0's values of the tensors on every rank."""
    for tensor in tensors:
        dist.broadcast(tensor, 0)


def summed(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each value summed over the ranks, in one all-reduce (every rank has the same names)."""
    if not dist.is_initialized():
        return values
    total = torch.stack(list(values.values()))
    dist.all_reduce(total)
    return dict(zip(values, total))


def end_of_epoch(method, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where the ranks agree after an epoch: rank 0's BatchNorm running statistics on every rank,
    and the epoch's sums averaged over the ranks (the logged means of the global batches)."""
    if not dist.is_initialized():
        return totals
    broadcast(b for module in method.modules().values() for b in module.buffers())
    return {name: value / dist.get_world_size() for name, value in summed(totals).items()}


def evaluation_batches(dataset, batch_size: int, split: str = "test"):
    """This rank's share of the test (or validation) split in batches (data.test_batches); the
    evaluation sums the correct counts over the ranks (`summed`). The shares are contiguous and
    differ by one image at most. A split smaller than the world leaves the last ranks an empty
    share: each gets one batch of no images, so that it counts zero under every output's name."""
    rank, world = part()
    if world == 1:
        yield from data.test_batches(dataset, batch_size, split)
        return
    images, labels = getattr(dataset, f"{split}_images"), getattr(dataset, f"{split}_labels")
    share = replace(dataset, **{f"{split}_images": images.tensor_split(world)[rank],
                                f"{split}_labels": labels.tensor_split(world)[rank]})
    if len(getattr(share, f"{split}_labels")):
        yield from data.test_batches(share, batch_size, split)
    else:
        images, labels = next(data.test_batches(dataset, 1, split))
        yield images[:0], labels[:0]                                   # (0, 3, H, W), (0,)
