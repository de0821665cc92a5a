"""DP-SGD cost on the privimage UNet: one DP-SGD step over one plain step, per grad-sample mode.

A mode counts only if its per-sample gradients (ghost clipping: per-sample norms) equal a
one-example-at-a-time loop on the same UNet within atol=1e-5, rtol=1e-4.
    python -m bench cost [--batch 32] [--resolution 28] [--device cpu]
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import torch

from privsynth.generators import privimage
from privsynth.generators.privimage import unet
from privsynth.privacy import Budget, Charge, NoiseSource
from privsynth.privacy.dpsgd import DPSGD, PerSampleGradients, clipped_sum

MODES = ("functorch", "vmap", "hooks", "ew", "ghost")


def _model(args) -> torch.nn.Module:
    cfg = privimage.Config(draft="none", strength=1.0)
    gen = privimage.Generator(cfg, resolution=args.resolution, channels=args.channels)
    torch.manual_seed(0)
    return unet.build(gen._unet(10)).to(args.device)


def _inputs(b: int, args, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shape = (b, args.channels, args.resolution, args.resolution)
    x = torch.rand(shape, generator=g) * 2 - 1
    return tuple(v.to(args.device) for v in (x, torch.randint(0, 1000, (b,), generator=g),
                                             torch.randint(0, 11, (b,), generator=g),
                                             torch.randn(shape, generator=g)))


def _loss(device: str) -> Callable:
    alpha_bar = unet.schedule(device)
    return lambda net, x, t, y, e: unet.denoising_loss(net, x, t, y, e, alpha_bar)


def _per_sample(mode: str, model: torch.nn.Module, loss: Callable, clip: float):
    """A function inputs -> (per-sample grads or None, per-sample norms) for `mode`."""
    if mode in ("functorch", "vmap"):
        psg = PerSampleGradients(model, mode)

        def run(*inputs):
            g = psg(loss, *inputs)
            return g, torch.stack([x.flatten(1).pow(2).sum(1) for x in g]).sum(0).sqrt()
        return run
    if mode in ("hooks", "ew"):
        from opacus.grad_sample import GradSampleModule
        from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights

        gsm = (GradSampleModule(model, loss_reduction="sum") if mode == "hooks"
               else GradSampleModuleExpandedWeights(model, loss_reduction="sum"))

        def run(*inputs):
            loss(gsm, *inputs).sum().backward()
            g = [p.grad_sample for p in model.parameters()]
            for p in model.parameters():
                p.grad_sample, p.grad = None, None
            return g, torch.stack([x.flatten(1).pow(2).sum(1) for x in g]).sum(0).sqrt()
        return run
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", max_grad_norm=clip,
                                               use_ghost_clipping=True)

    def run(*inputs):  # ghost clipping: norms from a first backward, clipped sum from a second
        gsm.enable_hooks()
        per = loss(gsm, *inputs)
        per.sum().backward(retain_graph=True)
        norms = gsm.get_norm_sample()
        coef = gsm.get_clipping_coef()
        gsm.disable_hooks()
        model.zero_grad(set_to_none=True)
        (per * coef).sum().backward()
        return None, norms
    return run


def _reference(model: torch.nn.Module, loss: Callable, inputs) -> tuple[list, torch.Tensor]:
    rows = []
    for i in range(len(inputs[0])):
        model.zero_grad(set_to_none=True)
        loss(model, *(v[i:i + 1] for v in inputs)).sum().backward()
        rows.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    grads = [torch.stack([r[k] for r in rows]) for k in range(len(rows[0]))]
    return grads, torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()


def _exact(mode: str, args) -> tuple[bool, float]:
    """Whether `mode` matches the loop on a 3-example batch, and its worst relative error."""
    model, loss = _model(args), _loss(args.device)
    inputs = _inputs(3, args, seed=1)
    want, want_norms = _reference(model, loss, inputs)
    got, got_norms = _per_sample(mode, model, loss, 1e9)(*inputs)
    if got is None:  # ghost: only norms exist
        return (torch.allclose(got_norms, want_norms, atol=1e-5, rtol=1e-4),
                float(((got_norms - want_norms).abs() / want_norms).max()))
    ok = all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(got, want))
    diff = sum(float((a - b).pow(2).sum()) for a, b in zip(got, want)) ** 0.5
    err = diff / sum(float(b.pow(2).sum()) for b in want) ** 0.5  # over all parameters
    return ok, err


def _time(step: Callable[[], None], reps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _plain_step(args) -> Callable[[], None]:
    model, loss = _model(args), _loss(args.device)
    opt, inputs = torch.optim.Adam(model.parameters(), lr=1e-4), _inputs(args.batch, args)

    def step():
        opt.zero_grad(set_to_none=True)
        loss(model, *inputs).mean().backward()
        opt.step()
    return step


def _dp_step(mode: str, args) -> Callable[[], None]:
    model, loss = _model(args), _loss(args.device)
    run = _per_sample(mode, model, loss, 1.0)
    params = [p for p in model.parameters()]
    opt, inputs = torch.optim.Adam(params, lr=1e-4), _inputs(args.batch, args)
    charge = Charge("bench.dpsgd", 1.0, 0.01, 10**6, 1.0, "benchmark")
    mech = DPSGD(Budget(epsilon=1e9, delta=1e-5, accountant="rdp", charges=[charge]), charge,
                 expected_batch=args.batch, noise=NoiseSource())

    def step():
        grads, _ = run(*inputs)
        summed = [p.grad for p in params] if grads is None else clipped_sum(grads, 1.0)
        for p, g in zip(params, mech.noisy_gradient(summed)):
            p.grad = g
        opt.step()
    return step


def run(args) -> list[dict]:
    """Measure every mode; print a Markdown table and return the rows."""
    torch.set_num_threads(args.threads) if args.threads else None
    plain = _time(_plain_step(args), args.reps)
    rows = [{"mode": "non-private", "exact": True, "rel_err": 0.0, "step_s": plain, "ratio": 1.0}]
    for mode in args.modes:
        try:
            ok, err = _exact(mode, args)
            step_s = _time(_dp_step(mode, args), args.reps)
        except Exception as exc:  # a mode that cannot run this model is reported, not hidden
            rows.append({"mode": mode, "exact": False, "error": f"{type(exc).__name__}: {exc}"[:120]})
            continue
        rows.append({"mode": mode, "exact": ok, "rel_err": err, "step_s": step_s,
                     "ratio": step_s / plain if ok else None})
    params = sum(p.numel() for p in _model(args).parameters())
    print(f"privimage UNet ({params / 1e6:.2f}M params, {args.resolution}px, {args.channels} ch), "
          f"batch {args.batch}, device {args.device}, torch threads {torch.get_num_threads()}")
    print("| mode | per-sample grads exact | max rel. error | step s | DP / non-private |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | fails to run | - | - | ({r['error']}) |")
            continue
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "not counted (inexact)"
        print(f"| {r['mode']} | {'yes' if r['exact'] else 'NO'} | {r['rel_err']:.1e} | "
              f"{r['step_s']:.3f} | {ratio} |")
    if args.json:
        print(json.dumps(rows))
    return rows
