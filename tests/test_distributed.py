"""train.py under torchrun on the CPU (gloo, 2 processes, a tiny synthetic set): one run directory,
the ranks' slices of a batch, one teacher on every rank, a dead rank and the resumption, a SIGTERM
to one rank, an evaluation split smaller than the world, the data barrier, --sync-bn's BatchNorm
(against one process, on two ranks), the run-directory lock, the world size and the batch size
that depends on it."""
import contextlib
import copy
import csv
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

import data
import models
import train
from infra import distributed
from methods import DKEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_FILES = {"config.json", "metrics.csv", "checkpoint.pt", "deployable.pt", "deployable.pt2",
             "summary.json", "curves.png", ".lock"}
FLAGS = ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "2", "--batch-size", "32",
         "--device", "cpu"]

# The launched train.py: the test's monkeypatch does not reach a subprocess, so this script gives
# train.py a tiny synthetic set of its own (TRAIN_IMAGES, 64 by default, and TEST_IMAGES, 32: 2
# steps of 2 x 16 images per epoch), saves every rank's networks after every epoch beside the run
# directory (<out-dir>.rank<r>.epoch<e>.pt) for the test to compare, with DIE_AT_EPOCH set lets
# rank 1 die at the start of that epoch (0-based), as a killed or crashed process does, and with
# SIGTERM_AT_STEP set sends rank 1 alone a SIGTERM in its optimizer step of that number (1-based).
# Each rank writes its exit code to <out-dir>.rank<r>.exit (torchrun's report may show a signal
# instead for a rank that it stops while that rank's interpreter shuts down), and to
# <out-dir>.rank<r>.alive the number of DDP modules still alive once train.main has returned.
WORKER = """
import os, signal, sys
import torch
sys.path.insert(0, os.environ["PROJECT"])
import train
rank, die_at = int(os.environ["RANK"]), int(os.environ.get("DIE_AT_EPOCH", -1))
sigterm_at = int(os.environ.get("SIGTERM_AT_STEP", -1))
train_size = int(os.environ.get("TRAIN_IMAGES", 64))
test_size = int(os.environ.get("TEST_IMAGES", 32))
real_save, real_weights = train.rundir.save_checkpoint, train.epoch_weights
real_step = train.student_step
steps = []

def tiny(name, data_dir, device, seed=0):
    images, labels = train.data.make_synthetic(train_size + test_size, seed)
    return train.data.ImageData(name, images[:train_size], labels[:train_size],
                                    images[train_size:], labels[train_size:], (0.5, 0.5, 0.5),
                                    (0.25, 0.25, 0.25), 10)

def save(out_dir, modules, optimizer, scheduler, state, config):
    nets = {name: module.state_dict() for name, module in modules.items()}
    torch.save(nets, f"{out_dir}.rank{rank}.epoch{state['epoch']}.pt")
    real_save(out_dir, modules, optimizer, scheduler, state, config)

def weights(args, index):  # called at the start of every epoch
    if rank == 1 and index == die_at:
        os._exit(1)
    return real_weights(args, index)

def step(*args):
    steps.append(len(steps) + 1)
    if rank == 1 and len(steps) == sigterm_at:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_step(*args)

train.data.load_data, train.rundir.save_checkpoint, train.epoch_weights = tiny, save, weights
train.student_step = step
try:
    code = train.main()
except SystemExit as stop:  # the ranks other than 0 leave through SystemExit (distributed.session)
    code = stop.code
with open(f"{os.environ['OUT_DIR']}.rank{rank}.exit", "w") as f:
    f.write(str(code))
import gc
from torch.nn.parallel import DistributedDataParallel
with open(f"{os.environ['OUT_DIR']}.rank{rank}.alive", "w") as f:
    f.write(str(sum(type(o) is DistributedDataParallel for o in gc.get_objects())))
sys.exit(code)
"""


# Two ranks of one gloo group, started by the test (`two_ranks`) without train.py.
# 1. The data barrier. Each rank writes to <OUT>/loads what it does with the data set: LOCAL_RANK 0
# loads it in distributed.data_once_per_node, for 1 s (a download), then every rank reads it, as
# train.py does next. all_reduce has NCCL's semantics there: it queues the reduction and returns
# at once.
# 2. --sync-bn's layers. Each case of <OUT>/layers.pt (sync_bn_cases) made synchronised
# (distributed.sync_batchnorm) on this rank's half of every view of the global batch (channels_last
# for images, the trunk's format), forward and backward; <OUT>/rank<r>.pt: the results and the
# operators that ran.
TWO_RANKS = """
import os, sys, time
from types import SimpleNamespace
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
sys.path.insert(0, os.environ["PROJECT"])
from infra import distributed
rank, out = int(os.environ["RANK"]), os.environ["OUT"]
dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)

def record(event):
    with open(f"{out}/loads", "a") as f:
        f.write(f"{rank} {event}\\n")

def load(name, data_dir, device, seed=0):
    record("starts loading")
    time.sleep(1)
    record("has loaded")

reduce = dist.all_reduce
dist.all_reduce = lambda tensor, *args, **kwargs: reduce(tensor, async_op=True)
distributed.data.load_data = load
distributed.data_once_per_node(SimpleNamespace(dataset="cifar10", data_dir=out, device="cpu",
                                               seed=0))
record("reads")
dist.all_reduce = reduce

class Operators(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))

results = {}
for name, (layer, inputs, grads) in torch.load(f"{out}/layers.pt", weights_only=False).items():
    net = torch.nn.Sequential(layer)
    distributed.sync_batchnorm(net)
    net[0].views = len(inputs)
    half = lambda t: t.tensor_split(2, dim=1)[rank].flatten(0, 1)              # (M * B/2, ...)
    x = half(inputs)
    x = (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x).requires_grad_()
    with Operators() as operators:
        output = net(x)
        (output * half(grads)).sum().backward()
    synced = net[0]
    results[name] = {"output": output, "input": x.grad, "weight": synced.weight.grad,
                     "bias": synced.bias.grad, "running_mean": synced.running_mean,
                     "running_var": synced.running_var, "batches": synced.num_batches_tracked,
                     "operators": operators.names}
torch.save(results, f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


def sync_bn_cases():
    """What --sync-bn synchronises, as built: a trunk layer (models.ViewBatchNorm2d, 3 views of 4
    images of 5 channels) and ONE's gate (BatchNorm1d, one view of 4 vectors of 6), in fp64 with
    random affine parameters and running statistics, each with a global batch (M, B, C, ...) and
    the gradient of a loss with respect to its output."""
    torch.manual_seed(0)
    cases = {}
    for name, layer, shape in (("trunk", models.ViewBatchNorm2d(5), (3, 4, 5, 3, 3)),
                               ("gate", torch.nn.BatchNorm1d(6), (1, 4, 6))):
        layer.double()
        with torch.no_grad():
            layer.weight.uniform_(0.5, 2), layer.running_var.uniform_(0.5, 2)
            layer.bias.normal_(), layer.running_mean.normal_()
        cases[name] = (layer, 3 * torch.randn(shape, dtype=torch.float64) + 2,
                       torch.randn(shape, dtype=torch.float64))
    return cases


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """TWO_RANKS on 2 processes; the folder they wrote to."""
    out = tmp_path_factory.mktemp("two_ranks")
    (out / "two_ranks.py").write_text(TWO_RANKS)
    torch.save(sync_bn_cases(), out / "layers.pt")
    env = {**os.environ, "PROJECT": ROOT, "OUT": str(out), "OMP_NUM_THREADS": "1",
           "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, str(out / "two_ranks.py")], text=True,
                              stderr=subprocess.PIPE,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in (0, 1)]
    errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], errors
    return out


def test_the_other_ranks_read_the_data_set_once_local_rank_0_has_loaded_it(two_ranks):
    # Under NCCL an all_reduce returns before the other ranks have reached it: the barrier must hold
    # rank 1 until rank 0 has loaded the data set.
    events = (two_ranks / "loads").read_text().split("\n")[:-1]
    assert events[:2] == ["0 starts loading", "0 has loaded"]
    assert sorted(events[2:]) == ["0 reads", "1 reads"]


@pytest.mark.parametrize("name", ["trunk", "gate"])
def test_sync_bn_on_two_ranks_is_one_process_on_the_global_batch_without_host_syncs(two_ranks,
                                                                                   name):
    ranks = [torch.load(two_ranks / f"rank{rank}.pt")[name] for rank in (0, 1)]
    # The layer before synchronisation in one process, on the whole global batch: the statistics of
    # each view's B images (per view, as M separate passes: tests/test_models.py).
    layer, inputs, grads = sync_bn_cases()[name]
    layer.views = len(inputs)
    x = inputs.flatten(0, 1).requires_grad_()
    output = layer(x)
    (output * grads.flatten(0, 1)).sum().backward()

    def halves(t):  # the rows of rank 0 and rank 1
        return [half.flatten(0, 1) for half in t.unflatten(0, inputs.shape[:2]).tensor_split(2, 1)]

    for rank, (output_part, input_part) in enumerate(zip(halves(output), halves(x.grad))):
        torch.testing.assert_close(ranks[rank]["output"], output_part)
        torch.testing.assert_close(ranks[rank]["input"], input_part)
    # DDP adds up the ranks' gradients of the affine parameters (and divides by N).
    torch.testing.assert_close(ranks[0]["weight"] + ranks[1]["weight"], layer.weight.grad)
    torch.testing.assert_close(ranks[0]["bias"] + ranks[1]["bias"], layer.bias.grad)
    for rank in ranks:
        torch.testing.assert_close(rank["running_mean"], layer.running_mean)
        torch.testing.assert_close(rank["running_var"], layer.running_var)
        assert rank["batches"] == len(inputs)  # one update per view
        # One collective in each pass, and nothing that waits for the device's values: .item()
        # (_local_scalar_dense), indexing with a mask (SyncBatchNorm's count_all[mask]).
        operators = rank["operators"]
        assert operators.count("c10d.allgather_.default") == 1
        assert operators.count("c10d.allreduce_.default") == 1
        assert not {"aten._local_scalar_dense.default", "aten.index.Tensor", "aten.nonzero.default",
                    "aten.masked_select.default"} & set(operators)
    if name == "trunk":
        assert ranks[0]["output"].is_contiguous(memory_format=torch.channels_last)


def torchrun(out_dir, *flags, die_at=None, **settings):
    """train.py (through WORKER) on 2 CPU processes; torchrun waits 2 s between its checks of the
    workers, so that rank 0 has the time to say that rank 1 died before torchrun stops it.
    `settings`: WORKER's other environment variables (SIGTERM_AT_STEP, TRAIN_IMAGES,
    TEST_IMAGES)."""
    worker = out_dir.parent / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "PROJECT": ROOT, "OUT_DIR": str(out_dir), "OMP_NUM_THREADS": "1",
           **{name: str(value) for name, value in settings.items()}}
    if die_at is not None:
        env["DIE_AT_EPOCH"] = str(die_at)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", "--monitor-interval", "2", str(worker), *FLAGS,
               "--out-dir", str(out_dir), *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def nets(path):
    return torch.load(path, weights_only=False)


def read_metrics(out_dir):
    with open(out_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-epoch DKEL run under torchrun, and what torchrun printed."""
    out_dir = tmp_path_factory.mktemp("straight") / "run"
    result = torchrun(out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir, result


def test_torchrun_run_writes_one_run_directory(straight):
    out_dir, result = straight
    assert set(os.listdir(out_dir)) == RUN_FILES  # rank 0's files, no temporary left
    run_dirs = [p for p in os.listdir(out_dir.parent) if os.path.isdir(out_dir.parent / p)]
    assert run_dirs == ["run"]
    assert json.load(open(out_dir / "config.json"))["world_size"] == 2
    assert [row["epoch"] for row in read_metrics(out_dir)] == ["1", "2"]
    # Rank 0 only.
    assert result.stdout.count("epoch 1/2 ") == 1 and result.stdout.count("headline") == 1
    assert "FutureWarning" not in result.stderr  # DDP's flags are the current release's


def test_teacher_and_student_are_identical_on_every_rank(straight):
    out_dir, _ = straight
    # (rank, epoch) -> its networks
    saved = {(r, e): nets(f"{out_dir}.rank{r}.epoch{e}.pt") for r in (0, 1) for e in (1, 2)}
    for epoch in (1, 2):
        for name in ("teacher", "student"):
            rank0, rank1 = saved[0, epoch][name], saved[1, epoch][name]
            assert rank0.keys() == rank1.keys()
            for key, value in rank0.items():
                assert torch.equal(value, rank1[key]), f"epoch {epoch} {name}.{key}"
    checkpoint = nets(out_dir / "checkpoint.pt")  # what rank 0 saved is what every rank holds
    assert all(torch.equal(v, checkpoint["teacher"][k]) for k, v in saved[1, 2]["teacher"].items())
    moved = [not torch.equal(v, saved[1, 2]["teacher"][k])
             for k, v in saved[1, 1]["teacher"].items()]
    assert any(moved)  # Eq. (5) in epoch 2


def test_a_dead_rank_stops_the_run_and_resume_continues_it_exactly(straight, tmp_path):
    reference, _ = straight
    out_dir = tmp_path / "run"
    died = torchrun(out_dir, die_at=1)
    assert died.returncode != 0
    assert "another rank of this torchrun run stopped" in died.stderr
    assert nets(out_dir / "checkpoint.pt")["epoch"] == 1 and len(read_metrics(out_dir)) == 1
    resumed = torchrun(out_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = nets(reference / "checkpoint.pt"), nets(out_dir / "checkpoint.pt")
    for name in ("student", "teacher"):
        for key, value in a[name].items():
            assert torch.equal(value, b[name][key]), f"{name}.{key}"
    timing = {"epoch_seconds", "images_per_s"}
    assert ([{k: v for k, v in row.items() if k not in timing} for row in read_metrics(reference)]
            == [{k: v for k, v in row.items() if k not in timing} for row in read_metrics(out_dir)])


def test_sigterm_to_one_rank_stops_every_rank_at_one_step_with_143_and_resume_continues(tmp_path):
    # 96 training images in batches of 8 (4 a rank): 12 steps an epoch. Rank 1 alone gets SIGTERM in
    # step 14, the 2nd of epoch 2; the ranks agree on the stop after step 16 (every 8 steps), so
    # rank 0, which no signal reached, stops there too. One test image: rank 1's share is empty.
    # With --sync-bn: the one torchrun run of the synchronised BatchNorm (DDP, gloo, --resume).
    out_dir, small = tmp_path / "run", {"TRAIN_IMAGES": 96, "TEST_IMAGES": 1}
    flags = ["--batch-size", "8", "--sync-bn"]
    stopped = torchrun(out_dir, *flags, SIGTERM_AT_STEP=14, **small)
    assert [(out_dir.parent / f"run.rank{r}.exit").read_text() for r in (0, 1)] == ["143", "143"]
    # Nothing of the stopped run (DDP's reducer, its process group) is left to the interpreter's
    # shutdown, where torch's teardown once aborted a rank (SIGABRT).
    assert [(out_dir.parent / f"run.rank{r}.alive").read_text() for r in (0, 1)] == ["0", "0"]
    # Rank 0's line.
    assert "error: stopped by SIGTERM: the 1 finished epoch(s) are saved" in stopped.stderr
    assert "exitcode  : 143" in stopped.stderr  # torchrun's report names the ranks' code
    assert stopped.returncode == 1  # torchrun's own code whenever a rank fails
    assert nets(out_dir / "checkpoint.pt")["epoch"] == 1 and len(read_metrics(out_dir)) == 1
    resumed = torchrun(out_dir, *flags, "--resume", **small)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = read_metrics(out_dir)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert float(rows[1]["acc_teacher_peer0"]) in (0.0, 100.0)  # one image, counted once


@pytest.mark.parametrize("world", [2, 4])
def test_the_ranks_slices_are_the_one_process_batch(world):
    # 3 batches of 16, the last 4 images dropped.
    images, labels = data.make_synthetic(52, seed=0)
    dataset = data.ImageData("synthetic", images, labels, images[:1], labels[:1], (0.5,) * 3,
                             (0.25,) * 3, num_classes=10)

    def epoch(part):
        generator = data.epoch_generator(0, 5, dataset.device)
        return list(data.train_batches(dataset, 16, 3, generator, part))

    single, slices = epoch((0, 1)), [epoch((rank, world)) for rank in range(world)]
    assert len(single) == 3 and all(len(s) == 3 for s in slices)
    for step, (views, labels) in enumerate(single):
        parts = [s[step] for s in slices]
        assert all(p[0].shape == (3, 16 // world, 3, 32, 32) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts], dim=1), views)
        assert torch.equal(torch.cat([p[1] for p in parts]), labels)


def dkel(seed=0):
    torch.manual_seed(seed)
    return DKEL(models.multi_peer_net("resnet8", 10, 3), temperature=3.0, kd_weight=1.0,
                ema_decay=0.999, init_iters=0, init_lr=0.1)


def test_a_rank_whose_share_of_the_split_is_empty_counts_zero_under_every_name(monkeypatch):
    # One test image and two ranks: rank 0 holds the image, rank 1 nothing; the all-reduce of
    # `summed` adds the ranks' counts name by name, so rank 1 must count zero under rank 0's names.
    method = dkel()
    images, labels = data.make_synthetic(1, seed=0)
    dataset = data.ImageData("synthetic", images, labels, images, labels, (0.5,) * 3, (0.25,) * 3,
                             num_classes=10)
    accuracies = []
    for part in ((0, 1), (0, 2), (1, 2)):  # one process; rank 0 and rank 1 of two
        monkeypatch.setattr(distributed, "part", lambda: part)
        accuracies.append(train.evaluate(method, dataset, 16, "fp32"))
    single, rank0, rank1 = accuracies
    assert "acc_teacher_ensemble" in single and rank0.keys() == rank1.keys() == single.keys()
    assert set(rank1.values()) == {0.0}
    assert rank0 == single  # the sum over the ranks is one process's count


@pytest.fixture
def one_process_group(tmp_path):
    """The gloo process group of a torchrun run with one process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.usefixtures("one_process_group")
def test_sync_bn_keeps_each_views_statistics_and_the_parameter_objects():
    method = dkel()
    reference = copy.deepcopy(method.student)  # per-view BatchNorm in one process (test_models.py)
    tensors = {name: [*m.parameters(), *m.buffers()] for name, m in method.modules().items()}
    distributed.prepare(method, SimpleNamespace(sync_bn=True, device="cpu"))
    for name, module in method.modules().items():  # what the optimizer and Eq. (5) hold
        now = [*module.parameters(), *module.buffers()]
        assert all(a is b for a, b in zip(now, tensors[name], strict=True))
        bns = [type(m) for m in module.modules() if isinstance(m, _BatchNorm)]
        # The trunk's 6 (stem 1, stage 1: 2, stage 2: 2 + projection) and 3 in each of 3 branches.
        assert bns == [distributed.ViewSyncBatchNorm] * (6 + 3 * 3), name
    # With one rank the global batch is this process's: the trunk's layers, which run_trunk makes
    # per view, give M separate passes of one-process BatchNorm, outputs and running statistics.
    views = torch.randn(3, 4, 3, 32, 32)                                         # (M, B, 3, H, W)
    student = method.student
    out = student.run_trunk(views)                                               # (M, B, ...)
    expected = torch.stack([reference.trunk(views[i]) for i in range(3)])        # (M, B, ...)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(student.trunk.state_dict().items(),
                                 reference.trunk.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7), name
    assert all(bn.views == 1 for bn in student.trunk.modules()
               if isinstance(bn, distributed.ViewSyncBatchNorm))


@pytest.mark.usefixtures("small_data")
def test_the_lock_of_a_killed_holder_blocks_no_resume_and_another_world_size_is_refused(
        straight, capsys):
    out_dir, _ = straight
    resume = [*FLAGS, "--out-dir", str(out_dir), "--resume"]
    hold = ("import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out_dir / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert train.main(resume) == 2
        assert f"another process is training into {out_dir}" in capsys.readouterr().err
    finally:
        holder.kill()  # SIGKILL, no clean-up: the operating system releases the lock
        holder.wait()
    # Past the lock, the resumption reaches the checkpoint, which 2 processes made: one is refused.
    assert train.main(resume) == 2
    assert ("trained by 2 process(es) (torchrun's world size) and this run has 1"
            in capsys.readouterr().err)


@pytest.mark.usefixtures("small_data")
def test_compile_under_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.main([*FLAGS, "--out-dir", str(tmp_path), "--compile"]) == 2
    assert "--compile runs in one process only" in capsys.readouterr().err


@pytest.mark.usefixtures("small_data")
def test_a_batch_size_that_the_world_size_does_not_divide_is_refused(tmp_path, capsys,
                                                                     monkeypatch):
    # Checked before joining.
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert train.main([*FLAGS, "--out-dir", str(tmp_path), "--batch-size", "32"]) == 2
    assert ("--batch-size 32 is the global batch and must be divisible by the 3 processes"
            in capsys.readouterr().err)


def test_a_rank_without_a_gpu_of_its_own_says_so_in_one_line_before_touching_cuda(
        monkeypatch, capsys):
    # torchrun --nproc_per_node 2 on a machine that shows one GPU: rank 1 has no GPU of its own.
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    touched = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: touched.append(device))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: touched.append(backend))
    args = SimpleNamespace(device="cuda", batch_size=8, world_size=2, sync_bn=False, compile=False)
    with pytest.raises(SystemExit) as stop:
        distributed.join(args, 1, contextlib.ExitStack())
    assert stop.value.code == 2 and touched == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert ("more processes on this machine than the 1 visible GPU(s) (LOCAL_RANK 1); give "
            "--nproc_per_node 1 or fewer" in err)
