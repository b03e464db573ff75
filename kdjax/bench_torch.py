"""The PyTorch eager side of ``python -m kdjax.bench --compare-torch``.

The same three steps per teacher→student pair as ``kdjax.bench.jax_workloads``, written
the way the PyTorch distillation zoo runs them (NCHW, SGD momentum 0.9, weight decay
5e-4, eval-mode teacher under ``torch.no_grad``), on the architectures' PyTorch twins
(``kdjax.torch_zoo``, parameter counts asserted equal to kdjax's). PyTorch uses all
cores (``torch.set_num_threads(os.cpu_count())``).

PyTorch runs in its own worker process (``TorchWorker``): in one process, the thread pool
of whichever library ran last can keep spinning and steal cores from the other, which
biases an alternated comparison.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import types

import torch
import torch.nn.functional as F

from kdjax import torch_zoo


def kd_loss(student_logits, teacher_logits, temperature: float):
    """T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), batch mean."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature ** 2


def check_twin(name: str, net, classes: int, shape) -> None:
    """The twin has exactly the kdjax model's parameters (else the comparison is void)."""
    from kdjax import models
    from kdjax.pruning.cost import model_cost

    ours = model_cost(models.get_model(name, classes), tuple(shape))["params"]
    theirs = sum(p.numel() for p in net.parameters())
    if ours != theirs:
        raise AssertionError(f"PyTorch twin of {name} has {theirs} parameters, kdjax {ours}")


def without_batchnorm(net):
    """A copy of ``net`` whose every ``BatchNorm2d`` is the identity: the PyTorch side of
    the bench's ``--bn-folding-bound`` row, so both sides drop the same work."""
    net = copy.deepcopy(net)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(parent, name, torch.nn.Identity())
    return net


def workloads(teacher_name: str, student_name: str, args) -> list[dict]:
    """Rows {'step', 'run', 'flops'} in the order of kdjax.bench.jax_workloads
    (flops are not used for PyTorch: the ratio is of images/s)."""
    torch.set_num_threads(os.cpu_count() or 1)
    h, w, c = args.image
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, c, h, w, generator=gen)
    labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
    teacher = torch_zoo.get_model(teacher_name, args.classes, c).eval()
    check_twin(teacher_name, teacher, args.classes, args.image)

    def train_row(name, teacher_net):
        student = torch_zoo.get_model(student_name, args.classes, c).train()
        check_twin(student_name, student, args.classes, args.image)
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

        def run():
            opt.zero_grad(set_to_none=True)
            logits = student(images)
            loss = F.cross_entropy(logits, labels)
            if teacher_net is not None:
                with torch.no_grad():
                    teacher_logits = teacher_net(images)
                loss = 0.1 * loss + 0.9 * kd_loss(logits, teacher_logits, 4.0)
            loss.backward()
            opt.step()

        return {"step": name, "run": run, "flops": 0}

    def inference_row(name, net):
        def infer():
            with torch.no_grad():
                net(images)

        return {"step": name, "run": infer, "flops": 0}

    from kdjax.bench import BN_BOUND_ROW

    bound = ([inference_row(BN_BOUND_ROW.format(teacher_name), without_batchnorm(teacher))]
             if args.bn_folding_bound else [])
    return [train_row(f"{student_name} CE train step", None),
            train_row(f"KD {teacher_name} -> {student_name}", teacher),
            inference_row(f"{teacher_name} inference", teacher)] + bound


def _serve(conn) -> None:
    """Worker loop: ('build', teacher, student, args dict) -> step names;
    ('time', index, warmup, repeats) -> median seconds; None -> exit."""
    from kdjax.bench import median_seconds

    rows = []
    while (request := conn.recv()) is not None:
        if request[0] == "build":
            _, teacher, student, args = request
            rows = workloads(teacher, student, types.SimpleNamespace(**args))
            conn.send([r["step"] for r in rows])
        else:
            _, index, warmup, repeats = request
            conn.send(median_seconds(rows[index]["run"], warmup, repeats))


class TorchWorker:
    """A PyTorch process timing the rows of one pair at a time, on request."""

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child,), daemon=True)
        self._process.start()

    def build(self, teacher: str, student: str, args) -> list[str]:
        self._conn.send(("build", teacher, student, {
            "batch": args.batch, "image": tuple(args.image), "classes": args.classes,
            "bn_folding_bound": args.bn_folding_bound}))
        return self._conn.recv()

    def seconds(self, index: int, warmup: int, repeats: int) -> float:
        self._conn.send(("time", index, warmup, repeats))
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=30)
