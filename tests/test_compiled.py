"""train.py --compile (infra/compiled.py): for PCL, DK and DKEL the whole step is one graph (no
graph break), nothing recompiles when lr, r(ep), w(ep) or alpha change, and 3 steps give eager's
losses and weights. Traced with the aot_eager backend, which runs the traced graph's own ops
without code generation: inductor's compile of even resnet8 takes about a minute on the 2-core
CPU, too long for the suite (docs/performance.md gives inductor's figures)."""
import functools

import pytest
import torch
from torch._dynamo.utils import counters

import data
import train
from infra import compiled
from methods import DK, DKEL, PCL
from models import multi_peer_net

METHODS = {"pcl": PCL, "dk": DK, "dkel": DKEL}
STEPS = 3


def build(name: str):
    """The method (resnet8, M = 3) and train.py's optimizer, from seed 0."""
    torch.manual_seed(0)
    extra = {} if name == "pcl" else {"init_iters": 0, "init_lr": 0.1}
    method = METHODS[name](multi_peer_net("resnet8", 10, 3), temperature=3.0, kd_weight=1.0,
                           ema_decay=0.9, authors_ema_warmup=True, **extra)
    train.channels_last(method)
    optimizer = train.sgd(method.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    method.set_mode(True)
    return method, optimizer


def run(name: str, compile: bool) -> tuple[list[float], dict]:
    """STEPS steps, each with another lr, r(ep) and w(ep) (alpha changes too: the authors'
    warm-up), as the epochs change them; the losses and every floating-point tensor after."""
    method, optimizer = build(name)
    step = train.training_step(method, optimizer, "bf16", compile, torch.device("cpu"))
    dataset = data.synthetic_data(4 * STEPS, 1, 0)
    batches = data.train_batches(dataset, 4, 3, data.epoch_generator(0, 0, dataset.device))
    losses = []
    for index, (views, labels) in enumerate(batches):
        weights = {"rampup": 0.2 + 0.3 * index, "teacher_ensemble_weight": 0.9 - 0.3 * index}
        losses.append(step(views, labels, weights, index)[0].item())
        optimizer.param_groups[0]["lr"] *= 0.5
    state = {f"{module}.{key}": value.clone() for module, network in method.modules().items()
             for key, value in network.state_dict().items() if value.is_floating_point()}
    return losses, state


@pytest.fixture(scope="module")
def runs():
    """Each method eager and compiled, with the compiled runs' graph counts."""
    real = torch.compile
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiled.torch, "compile", functools.partial(real, backend="aot_eager"))
        results = {}
        for name in METHODS:
            torch._dynamo.reset()
            counters.clear()
            results[name] = {"eager": run(name, False), "compiled": run(name, True),
                             "graphs": counters["stats"]["unique_graphs"],
                             "breaks": sum(counters["graph_break"].values())}
    return results


@pytest.mark.parametrize("name", list(METHODS))
def test_the_whole_step_is_one_graph_compiled_once(runs, name):
    assert runs[name]["graphs"] == 1 and runs[name]["breaks"] == 0


@pytest.mark.parametrize("name", list(METHODS))
def test_compiled_steps_give_eagers_losses_and_weights(runs, name):
    (eager_losses, eager), (losses, state) = runs[name]["eager"], runs[name]["compiled"]
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    start = build(name)[0]
    for key, value in eager.items():
        module, inner = key.split(".", 1)
        update = value - start.modules()[module].state_dict()[inner]
        error = (state[key] - value).norm() / update.norm().clamp_min(1e-12)
        assert error < 1e-3, key
