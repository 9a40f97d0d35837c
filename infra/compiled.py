"""train.py --compile: the student's whole step (the forward passes, the loss, the backward, the
SGD step and the teacher's Eq. (5)) as one function under torch.compile, on CUDA in the mode
"reduce-overhead" (CUDA graphs: the step's kernels replayed with one launch).

What changes between steps enters as tensors filled before each call, so that nothing recompiles:
the learning rate of each parameter group (the scheduler keeps its floats in the optimizer), r(ep)
and w(ep), and alpha of Eq. (5). The step computes what train.student_step and the method's
after_step compute, in three of the compiled graph's own terms:
- the gradients are torch.autograd.grad's, traced (torch._dynamo's trace_autograd_ops), and are
  never stored in .grad: Optimizer.zero_grad is not traced, and a traced loss.backward() gave a
  parameter another's gradient when some parameter had none (torch 2.14.1);
- the SGD update is torch.optim.sgd's functional form on the optimizer's own parameters and
  momentum buffers (Optimizer.step breaks the graph on purpose, torch issue 104053), its buffers
  made as zeros before the first step (SGD's first step copies the gradient into the buffer:
  momentum * 0 + gradient is that copy), skipping a parameter without a gradient as SGD does;
- Eq. (5) is the teacher's own `follow` (ema.EMATeacher) with alpha as a tensor.
"""
import torch
from torch.optim.sgd import sgd as functional_sgd

from ema import EMATeacher

SETTINGS = ("weight_decay", "momentum", "dampening", "nesterov", "maximize")


class CompiledStep:
    """`step(views, labels, weights, index)`: one step of the student and, for an EMA teacher,
    Eq. (5) after optimizer step `index`; returns the loss and its parts, detached."""

    def __init__(self, method, optimizer: torch.optim.SGD, precision: str,
                 device: torch.device):
        self.method, self.optimizer, self.precision = method, optimizer, precision
        self.groups = [group["params"] for group in optimizer.param_groups]
        # Each group's fixed settings, apart from its lr: the graph reads no optimizer's dict.
        self.settings = [{key: group[key] for key in SETTINGS} for group in optimizer.param_groups]
        for parameter in (p for params in self.groups for p in params):
            optimizer.state[parameter].setdefault("momentum_buffer", torch.zeros_like(parameter))
        self.buffers = [[optimizer.state[p]["momentum_buffer"] for p in params]
                        for params in self.groups]
        for buffer in (b for buffers in self.buffers for b in buffers):
            # Updated in place at a fixed address, as a parameter (CUDA graphs keep no copy).
            torch._dynamo.mark_static_address(buffer)
        self.lrs = [torch.zeros((), device=device) for _ in self.groups]
        self.alpha = torch.zeros((), device=device)
        teacher = getattr(method, "teacher", None)
        self.teacher = teacher if isinstance(teacher, EMATeacher) else None
        self.weights: dict[str, torch.Tensor] = {}
        self.cuda = device.type == "cuda"
        self.compiled = torch.compile(self.whole_step, fullgraph=True,
                                      mode="reduce-overhead" if self.cuda else None)

    def __call__(self, views: torch.Tensor, labels: torch.Tensor, weights: dict[str, float],
                 index: int):
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        for name, value in weights.items():
            self.weights.setdefault(name, torch.zeros_like(self.alpha)).fill_(value)
        if self.teacher is not None:
            self.alpha.fill_(self.teacher.ema_decay_at(index))
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs were read
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            loss, parts = self.compiled(views, labels, self.weights, self.lrs, self.alpha)
        if self.teacher is None:
            self.method.after_step(index)
        return loss, parts

    def whole_step(self, views, labels, weights, lrs, alpha):
        """train.student_step, then Eq. (5) (ema.EMATeacher.update), as one graph."""
        with torch.autocast(views.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            loss, parts = self.method.loss(views, labels, weights)
        every = [p for params in self.groups for p in params]
        gradients = dict(zip(every, torch.autograd.grad(loss, every, allow_unused=True)))
        with torch.no_grad():
            for params, lr, settings, buffers in zip(self.groups, lrs, self.settings,
                                                     self.buffers):
                used = [i for i, p in enumerate(params) if gradients[p] is not None]  # as SGD
                functional_sgd([params[i] for i in used], [gradients[params[i]] for i in used],
                               [buffers[i] for i in used], lr=lr, foreach=True, **settings)
            if self.teacher is not None:
                self.teacher.follow(alpha)
        return loss.detach(), parts
