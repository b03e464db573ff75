"""``python -m kdjax.bench``: throughput and FLOP utilisation of the train steps.

For each teacher→student pair it measures, after warm-up, the median images/s of
  * a student cross-entropy train step (forward, backward, SGD update, BN in train mode),
  * a KD train step (teacher eval-mode forward + student forward/backward/update),
  * teacher inference (eval-mode forward),
on random data, with the same compiled steps the trainer uses. Achieved GFLOP/s
uses the analytic MAC count of kdjax.pruning.cost with the usual convention:
forward = 2·MACs FLOPs per image, a train step = 3× forward (backward ≈ 2× forward).
``--dtype bfloat16`` runs the models in bfloat16 (train.compute_dtype); on a CPU that is
only a correctness check (XLA:CPU emulates bf16 convolutions, usually slower than fp32).
Images/s per device and model FLOPs utilisation (MFU: achieved FLOP/s per device over
the spec-sheet peak of the device kind for the dtype, kdjax.train.throughput) are shown
on devices in that table; elsewhere (CPU) "unknown device: MFU not shown", and the
measured fp32 matmul peak stays the reference.

    python -m kdjax.bench                       # default pairs, batch 64, 32x32x3, 100 classes
    python -m kdjax.bench --pairs resnet56:resnet20 --devices 2 --repeats 30
    python -m kdjax.bench --conv-profile resnet20   # where a train step's conv time goes
    python -m kdjax.bench --compare-torch           # each row alternated with PyTorch eager
    python -m kdjax.bench --pairs resnet32x4:resnet8x4 --distill-methods all
                                                # + one train-step row per distillation method
    python -m kdjax.bench --pruned-latency resnet56 # latency vs MACs, rounded widths or not
    python -m kdjax.bench --population-eval         # EMO-PMS loop / vmap / map, 1 vs 2 devices
    python -m kdjax.bench --conv-kernel-grad matmul --xla-flags="..."   # train-step levers
    python -m kdjax.bench --compare-torch --bn-folding-bound   # + inference without BN (bound)

A distillation row is the main-stage step of ``kdjax.distill`` method M with its default
settings (CRD: memory banks of ``--bank-size`` rows, 16384 negatives); for AB and FSP,
whose main stage adds no term (RepDistiller), that is the CE step plus the teacher.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

DEFAULT_PAIRS = ("resnet32x4:resnet8x4", "resnet56:resnet20")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m kdjax.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS),
                        help="teacher:student pairs of zoo model names")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image", type=int, nargs=3, default=(32, 32, 3), metavar=("H", "W", "C"))
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--devices", type=int, default=0,
                        help="spread the batch over N devices (on CPU: N simulated devices); "
                             "0 = kdjax's default (on CPU one device per core, see kdjax.platform)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--distill-methods", nargs="+", default=[], metavar="METHOD",
                        help="also one train-step row per kdjax.distill method "
                             "('all' = every method of the distillation zoo)")
    parser.add_argument("--bank-size", type=int, default=50000,
                        help="training-set size for methods with memory banks (CRD); "
                             "default: CIFAR's 50000")
    parser.add_argument("--conv-profile", metavar="MODEL", default="",
                        help="instead: time forward, input-gradient and kernel-gradient "
                             "convolutions at every distinct conv shape of MODEL")
    parser.add_argument("--compare-torch", action="store_true",
                        help="alternate each row with the same step in PyTorch eager "
                             "(kdjax.bench_torch; needs the torch extra) and print the ratio")
    parser.add_argument("--rounds", type=int, default=2,
                        help="with --compare-torch: kdjax/PyTorch alternations per row")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype of the models (train.compute_dtype)")
    parser.add_argument("--peak-size", type=int, default=2048,
                        help="side of the square fp32 matmul that measures the peak")
    parser.add_argument("--pruned-latency", metavar="MODEL", default="",
                        help="instead: eval latency of MODEL compacted at several MACs "
                             "targets, widths unrounded / rounded to 8 / 16 (kdjax.bench_speed)")
    parser.add_argument("--png", default="pruned_latency.png",
                        help="with --pruned-latency: where the latency-vs-MACs plot goes")
    parser.add_argument("--population-eval", action="store_true",
                        help="instead: EMO-PMS candidate evaluations/s, loop / vmap / map "
                             "on 1 and 2 devices (kdjax.bench_speed)")
    parser.add_argument("--conv-kernel-grad", choices=("xla", "matmul"), default="xla",
                        help="lever: kernel gradient of the zoo's convolutions "
                             "(kdjax.models.conv_grad)")
    parser.add_argument("--bn-folding-bound", action="store_true",
                        help="lever bound: one more row per pair, the teacher's inference "
                             "with every BatchNorm replaced by the identity (NOT the same "
                             "function; with --compare-torch on both sides) — the most "
                             "that folding BN into the convolutions could save in eval")
    parser.add_argument("--xla-flags", default="",
                        help="lever: extra XLA flags (e.g. XLA:CPU ones) appended to "
                             "XLA_FLAGS before JAX starts")
    return parser.parse_args(argv)


def set_simulated_devices(n: int) -> None:
    """Ask XLA for ``n`` host devices; must run before JAX initialises its backend."""
    from kdjax import platform

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith(platform.DEVICE_COUNT_FLAG)]
    os.environ["XLA_FLAGS"] = platform.cpu_device_flags(" ".join(flags), n)


def cpu_model() -> str:
    """The CPU model name (Linux /proc/cpuinfo), for the record of a measurement."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"CPU unknown x{os.cpu_count()}"


def median_seconds(fn, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def distill_methods(names) -> list[str]:
    """The ``--distill-methods`` list: 'all' = the zoo (every method but dynamic_kd, which
    needs its pipeline's controller), kd dropped (it is always the "KD t -> s" row);
    unknown names raise ValueError with the valid ones."""
    from kdjax.distill import METHODS

    zoo = [m for m in METHODS if m != "dynamic_kd"]
    chosen = zoo if list(names) == ["all"] else list(names)
    unknown = [m for m in chosen if m not in zoo]
    if unknown:
        raise ValueError(f"unknown --distill-methods {unknown}; valid: all, {', '.join(zoo)}")
    return [m for m in chosen if m != "kd"]


def jax_workloads(teacher_name, student_name, args, mesh, methods=()) -> list[dict]:
    """The three steps of one pair, then one distillation step per method of ``methods``,
    as timed callables: each row is {'step', 'run' (blocks until done), 'flops' per
    image}."""
    import jax
    import jax.numpy as jnp

    from kdjax import config_lib, distill, models
    from kdjax.pipelines import common
    from kdjax.pruning.cost import model_cost
    from kdjax.train import loop, optim, precision, sharding
    from kdjax.train.state import TrainState, make_train_step

    shape = tuple(args.image)
    teacher = models.get_model(teacher_name, args.classes)
    student = models.get_model(student_name, args.classes)
    teacher_vars = sharding.replicate(common.init_variables(teacher, shape, 0), mesh)
    rng = jax.random.PRNGKey(1)
    batch = sharding.to_global({
        "image": jax.random.normal(rng, (args.batch, *shape), jnp.float32),
        "label": jax.random.randint(rng, (args.batch,), 0, args.classes),
        "index": jnp.arange(args.batch, dtype=jnp.int32),
    }, mesh)
    tx = optim.sgd(config_lib.optim(), steps_per_epoch=100)
    macs_t = model_cost(teacher, shape)["macs"]
    macs_s = model_cost(student, shape)["macs"]

    def train_row(name, objective, teacher_model, flops_per_image):
        variables = common.init_variables(student, shape, 0)
        distill_vars = ({}, {})
        if objective.method is not None:
            distill_vars = objective.method.init(
                jax.random.PRNGKey(3),
                common.output_shapes(student, variables, shape, args.batch),
                common.output_shapes(teacher, teacher_vars, shape, args.batch), args.bank_size)
        state = TrainState.create(variables, tx, jax.random.PRNGKey(2),
                                  *distill_vars)  # fresh: the state is donated
        state = sharding.replicate(state, mesh)
        step = loop.compile_train_step(make_train_step(student, tx, objective, teacher_model,
                                                       compute_dtype=args.dtype), mesh)
        holder = [state]

        def run():
            holder[0], metrics = step(holder[0], batch, teacher_vars if teacher_model else None)
            jax.block_until_ready(metrics)

        return {"step": name, "run": run, "flops": flops_per_image}

    def distill_row(name, method_name):
        method = distill.make_method(config_lib.distill(method_name),
                                     student_taps=student.taps(), teacher_taps=teacher.taps())
        objective = distill.objective(method, method.default_ce_weight)
        return train_row(name, objective, teacher, 6 * macs_s + 2 * macs_t)

    def inference_row(name, without_batchnorm):
        def forward(v, x):
            with batchnorm_as_identity(without_batchnorm):
                return precision.apply(teacher, v, x, jnp.dtype(args.dtype), train=False)[0]

        infer = jax.jit(forward)
        return {"step": name, "flops": 2 * macs_t,
                "run": lambda: jax.block_until_ready(infer(teacher_vars, batch["image"]))}

    bound = ([inference_row(BN_BOUND_ROW.format(teacher_name), True)]
             if args.bn_folding_bound else [])
    return [
        train_row(f"{student_name} CE train step", common.supervised_objective, None, 6 * macs_s),
        distill_row(f"KD {teacher_name} -> {student_name}", "kd"),
        inference_row(f"{teacher_name} inference", False),
    ] + bound + [distill_row(f"distill {m} {teacher_name} -> {student_name}", m)
                 for m in methods]


# The --bn-folding-bound row (the same name on the PyTorch side).
BN_BOUND_ROW = "{} inference, BatchNorm dropped (bound)"


def batchnorm_as_identity(enabled: bool):
    """Context in which every ``flax.linen.BatchNorm`` call returns its input unchanged
    (active while a function is traced); a no-op context when not ``enabled``.

    With BN folded into the preceding convolution (W' = W·γ/σ, b' = β − μ·γ/σ) an eval
    forward keeps only a bias add, which XLA fuses into the ReLU / residual loop that
    follows; dropping BN altogether therefore bounds from above what folding can save."""
    import contextlib

    import flax.linen as nn

    if not enabled:
        return contextlib.nullcontext()

    def skip_batchnorm(call, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            return args[0]
        return call(*args, **kwargs)

    return nn.intercept_methods(skip_batchnorm)


def measure(row: dict, args) -> dict:
    """images/s and achieved GFLOP/s of one workload (median step time)."""
    seconds = median_seconds(row["run"], args.warmup, args.repeats)
    return {"img_per_s": args.batch / seconds,
            "gflops": row["flops"] * args.batch / seconds / 1e9}


def matmul_peak_gflops(mesh, args, size: int = 2048) -> float:
    """Measured fp32 peak of this device setting: one [size, size] @ [size, size] matmul per
    device of ``mesh`` at once (the rows are sharded), GFLOP/s = 2·size³·devices / time."""
    import jax
    import jax.numpy as jnp

    from kdjax.train import sharding

    a = jax.device_put(jnp.ones((size * mesh.size, size), jnp.float32),
                       sharding.batch_sharded(mesh))
    b = sharding.replicate(jnp.ones((size, size), jnp.float32), mesh)
    matmul = jax.jit(jnp.matmul, out_shardings=sharding.batch_sharded(mesh))
    seconds = median_seconds(lambda: matmul(a, b).block_until_ready(), args.warmup, args.repeats)
    return 2.0 * size ** 3 * mesh.size / seconds / 1e9


def compare_torch(pairs, args, mesh, peak: float) -> None:
    """Per row: kdjax and PyTorch eager alternated ``args.rounds`` times (kdjax first each
    round), both figures per round and the ratio of the medians over rounds."""
    from kdjax import bench_torch

    print("| step | PyTorch img/s (per round) | kdjax img/s (per round) | ratio | "
          "kdjax GFLOP/s | % of matmul peak |\n|---|---|---|---|---|---|")
    worker = bench_torch.TorchWorker()
    try:
        for teacher_name, student_name in pairs:
            ours = jax_workloads(teacher_name, student_name, args, mesh)
            names = worker.build(teacher_name, student_name, args)
            assert names == [r["step"] for r in ours], (names, [r["step"] for r in ours])
            for index, row in enumerate(ours):
                runs_a, runs_b = [], []
                for _ in range(args.rounds):
                    runs_a.append(measure(row, args))
                    runs_b.append(args.batch / worker.seconds(index, args.warmup, args.repeats))
                ratio = (statistics.median(r["img_per_s"] for r in runs_a)
                         / statistics.median(runs_b))
                gflops = statistics.median(r["gflops"] for r in runs_a)
                ours_img = " / ".join(f"{r['img_per_s']:.1f}" for r in runs_a)
                theirs_img = " / ".join(f"{v:.1f}" for v in runs_b)
                print(f"| {row['step']} | {theirs_img} | {ours_img} | "
                      f"{ratio:.2f}x | {gflops:.1f} | {100 * gflops / peak:.0f} |", flush=True)
    finally:
        worker.close()


def conv_profile(model_name: str, args) -> None:
    """Per distinct 3x3/1x1 conv shape of ``model_name`` (batch ``args.batch``): median time
    and GFLOP/s of the forward conv and of the two convolutions of its backward pass."""
    import jax

    from kdjax import models
    from kdjax.pruning.cost import model_cost

    layers = [l for l in model_cost(models.get_model(model_name, args.classes),
                                    tuple(args.image))["layers"] if l.get("kind") == "conv"]
    print("| conv (out HxW, Cin->Cout, k) | count | fwd ms (GFLOP/s) | d/dinput ms | "
          "d/dkernel ms |\n|---|---|---|---|---|")
    seen = {}
    for layer in layers:  # kernel k·k·Cin·Cout = params, output H·W = MACs / params
        cin, cout = layer["in_channels"] or args.image[2], layer["out_channels"]
        k = round((layer["params"] / (cin * cout)) ** 0.5)
        side = round((layer["macs"] / layer["params"]) ** 0.5)
        key = ((side, side), cin, cout, k)
        seen[key] = seen.get(key, 0) + 1
    for (hw, cin, cout, k), count in seen.items():
        pad = k // 2
        conv = lambda a, w: jax.lax.conv_general_dilated(
            a, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, *hw, cin))
        w = jax.random.normal(jax.random.PRNGKey(1), (k, k, cin, cout))
        g = jax.random.normal(jax.random.PRNGKey(2), (args.batch, *hw, cout))
        fns = [jax.jit(conv),
               jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
               jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])]
        flops = 2 * args.batch * hw[0] * hw[1] * k * k * cin * cout
        cells = []
        for i, fn in enumerate(fns):
            call = (lambda f=fn: f(x, w).block_until_ready()) if i == 0 else (
                lambda f=fn: f(x, w, g).block_until_ready())
            t = median_seconds(call, args.warmup, args.repeats)
            cells.append(f"{t * 1e3:.2f} ({flops / t / 1e9:.0f})")
        print(f"| {hw[0]}x{hw[1]}, {cin}->{cout}, {k}x{k} | {count} | " + " | ".join(cells) + " |",
              flush=True)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    if args.devices:
        set_simulated_devices(args.devices)
    else:
        from kdjax import platform

        platform.configure_cpu_devices()
    from kdjax import bench_speed
    from kdjax.models import conv_grad

    if args.conv_profile:
        conv_profile(args.conv_profile, args)
        return 0
    if args.pruned_latency:
        bench_speed.pruned_latency(args.pruned_latency, args, args.png)
        return 0
    if args.population_eval:
        bench_speed.population_eval(args)
        return 0
    with conv_grad.conv_kernel_grad(args.conv_kernel_grad):
        return benchmark(args)


def benchmark(args) -> int:
    """The train-step rows (with or without the PyTorch comparison)."""
    import jax

    from kdjax.train import sharding, throughput

    mesh = sharding.make_mesh(args.devices)
    pairs = [tuple(p.split(":", 1)) for p in args.pairs]
    peak = matmul_peak_gflops(mesh, args, args.peak_size)
    print(f"# kdjax.bench: batch {args.batch}, image {tuple(args.image)}, {args.classes} classes, "
          f"{mesh.size} {jax.devices()[0].platform} device(s), jax {jax.__version__}, "
          f"median of {args.repeats} after {args.warmup} warm-up; fp32 matmul peak of this "
          f"device setting {peak:.0f} GFLOP/s; {cpu_model()}; conv kernel grad "
          f"{args.conv_kernel_grad}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if args.compare_torch:
        compare_torch(pairs, args, mesh, peak)
        return 0
    device_peak = throughput.peak_flops(jax.devices()[0].device_kind, args.dtype)
    print(f"# {args.dtype}; spec-sheet peak of {jax.devices()[0].device_kind}: "
          + (f"{device_peak / 1e12:.0f} TFLOP/s" if device_peak else throughput.UNKNOWN_DEVICE))
    print("| step | img/s | img/s/device | GFLOP/s | % of matmul peak | MFU |\n"
          "|---|---|---|---|---|---|")
    for teacher_name, student_name in pairs:
        for row in jax_workloads(teacher_name, student_name, args, mesh,
                                 distill_methods(args.distill_methods)):
            m = measure(row, args)
            per_device = m["img_per_s"] / mesh.size
            util = throughput.mfu(per_device, row["flops"], device_peak)
            print(f"| {row['step']} | {m['img_per_s']:.1f} | {per_device:.1f} | "
                  f"{m['gflops']:.1f} | {100 * m['gflops'] / peak:.0f} | "
                  f"{'-' if util is None else f'{100 * util:.1f}%'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
