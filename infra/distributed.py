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
  bit-identical to one process), or with --sync-bn over the global batch (ViewSyncBatchNorm, on
  the CPU and on GPUs; the trunk's per-view BatchNorm stays per view). The running statistics are
  rank 0's, broadcast at the end of every epoch: the evaluation and the checkpoint see one model.
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
from models import PerViewStatistics

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
    """Refuse --compile; check that N divides --batch-size, and join torchrun's process group:
    NCCL on CUDA (each rank on the GPU of its LOCAL_RANK, refused in one line by a rank without
    one), gloo on the CPU. The other ranks' output is silenced (rank 0 prints the epoch lines, the progress bar and
    the summary); their crashes still show."""
    cuda = args.device.startswith("cuda")
    if args.compile:  # its backward is torch.autograd.grad, which DDP's all-reduce never sees
        raise RunStopped("--compile runs in one process only (infra/compiled.py); drop it under "
                         "torchrun", EXIT_BAD_INPUT)
    if args.batch_size % args.world_size:
        raise RunStopped(f"--batch-size {args.batch_size} is the global batch and must be "
                         f"divisible by the {args.world_size} processes of this torchrun run",
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
            sync_batchnorm(module)  # per-view BatchNorm stays per view (ViewSyncBatchNorm)
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


class ViewSyncBatchNorm(PerViewStatistics, _BatchNorm):
    """A BatchNorm layer (of any dimension) synchronised over the ranks of a torchrun run
    (--sync-bn), per view. In training, with `views` = M (set by models.MultiPeerNet.run_trunk on
    the trunk's layers, as for models.ViewBatchNorm2d; 1 in every other layer), view m is
    normalised with the mean and variance of the view-m images of every rank, the global batch's
    B images as one process has them, and the running statistics get the M updates of one
    process, view after view. That is what torch's SyncBatchNorm computes on each view, but in one
    all-gather per layer in the forward pass and one all-reduce in the backward for all M views,
    without a host sync (SyncBatchNorm makes one per call, `count_all[mask]`), and in plain tensor
    operations, so that it runs under gloo on the CPU as under NCCL. Every rank holds images of
    every view (B/N of them: join checks that N divides B). In eval mode it is plain BatchNorm; the
    state dict is BatchNorm's."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:  # (N, C, ...), as SyncBatchNorm
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        with torch.no_grad():
            mean, var, count = view_statistics(x, self.views)          # (M, C), (M, C), (M, 1)
            if self.track_running_stats:
                self.track(mean, var, count)
        weight, bias = self.weight, self.bias
        if not self.affine:  # the identity map
            weight, bias = torch.ones_like(mean[0]), torch.zeros_like(mean[0])
        return SyncedNormalisation.apply(x, weight, bias, mean, torch.rsqrt(var + self.eps), count)

    def track(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """The M updates of the running statistics, view after view, as torch's BatchNorm makes
        them: with the momentum (the cumulative average when it is None) and the unbiased
        variance."""
        for view_mean, view_var, n in zip(mean, var, count):
            self.num_batches_tracked.add_(1)
            factor = 1 / self.num_batches_tracked if self.momentum is None else self.momentum
            self.running_mean.mul_(1 - factor).add_(factor * view_mean)
            self.running_var.mul_(1 - factor).add_(factor * view_var * n / (n - 1))


def view_statistics(x: torch.Tensor, views: int) -> tuple[torch.Tensor, ...]:
    """Of x, M = `views` blocks of images on each rank: each view's mean and biased variance per
    channel over its images on every rank, and their number, (M, C), (M, C), (M, 1), in fp32 (fp64
    for fp64). Each rank's block means, sums of squared deviations and counts reach every rank in
    one all-gather of a fixed-size tensor and combine as torch's SyncBatchNorm combines the ranks'
    means and variances (batch_norm_gather_stats_with_counts: Chan et al.'s parallel variance)."""
    blocks = x.unflatten(0, (views, -1))                                        # (M, B/N, C, ...)
    dims, channels = statistic_dims(blocks), blocks.shape[2]
    mean = blocks.mean(dims, dtype=torch.promote_types(x.dtype, torch.float32))    # (M, C)
    squares = (blocks - per_view(mean, blocks)).square().sum(dims)                  # (M, C)
    count = torch.full_like(mean[:, :1], blocks[0].numel() // channels)             # (M, 1)
    local = torch.cat([mean, squares, count], dim=1)                                # (M, 2C + 1)
    ranks = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(ranks, local)
    means, squares, counts = torch.stack(ranks).split([channels, channels, 1], dim=2)  # (N, M, .)
    count = counts.sum(0)
    mean = (counts * means).sum(0) / count
    squares = squares.sum(0) + (counts * (means - mean).square()).sum(0)
    return mean, squares / count, count


def statistic_dims(blocks: torch.Tensor) -> tuple[int, ...]:
    """The dimensions of (M, B, C, ...) that BatchNorm reduces: all but the view and the channel."""
    return (1, *range(3, blocks.dim()))


def per_view(values: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(M, C) values shaped to broadcast against (M, B, C, ...) blocks."""
    return values.view(*values.shape[:1], 1, values.shape[1], *[1] * (blocks.dim() - 3))


class SyncedNormalisation(torch.autograd.Function):
    """BatchNorm's output, (x - mean) * invstd * weight + bias for each view with its statistics
    of the global batch, and the gradients of x, weight and bias as torch's SyncBatchNorm computes
    them: each view's sums of dy and dy (x - mean) over its images of every rank (one all-reduce
    for the M views) give the input's gradient; the weight's and the bias's stay this rank's, which
    DDP averages over the ranks with every other parameter's."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count):
        ctx.save_for_backward(x, weight, mean, invstd, count)
        blocks = x.unflatten(0, (len(mean), -1))
        centred = blocks - per_view(mean, blocks)
        scale, shift = per_view(invstd * weight, blocks), per_view(bias.expand_as(mean), blocks)
        return torch.addcmul(shift, centred, scale).to(x.dtype).flatten(0, 1)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd, count = ctx.saved_tensors
        blocks = x.unflatten(0, (len(mean), -1))
        dy = grad.unflatten(0, (len(mean), -1)).to(mean.dtype)
        centred, dims = blocks - per_view(mean, blocks), statistic_dims(blocks)
        sums = torch.stack([dy.sum(dims), (dy * centred).sum(dims)])                 # (2, M, C)
        grad_bias, grad_weight = sums[0].sum(0), (sums[1] * invstd).sum(0)  # this rank's
        dist.all_reduce(sums)                                                 # every rank's
        mean_dy, mean_dy_centred = sums / count
        grad_x = (dy - per_view(mean_dy, blocks)
                  - centred * per_view(invstd.square() * mean_dy_centred, blocks))
        grad_x = grad_x * per_view(invstd * weight, blocks)
        return (grad_x.to(x.dtype).flatten(0, 1), grad_weight.to(weight.dtype),
                grad_bias.to(weight.dtype), None, None, None)


def sync_batchnorm(module: nn.Module) -> None:
    """Synchronise every BatchNorm inside `module` over the ranks (--sync-bn), in place: each
    becomes a ViewSyncBatchNorm, per view in the trunk (models.ViewBatchNorm2d), over the whole
    batch elsewhere. Each keeps its parameter and buffer objects, which the optimizer and the EMA
    of Eq. (5) hold, so the state-dict keys stay as well."""
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            synced = ViewSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
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
