"""PrivImage step 3: DP-SGD fine-tuning of the denoiser on the private images, resumable.

Privacy units. Each step Poisson-samples units (q = dp_batch / U, from OS entropy); a sampled
unit's gradient is the mean of the per-image gradients of at most `unit_images` of its images,
clipped to C as one row (privsynth.privacy.dpsgd); noise is added once per step. With one image
per unit (the default) this is ordinary per-example DP-SGD.

Every random draw inside a step comes from OS entropy: the Poisson sample and the noise (as in
privsynth.privacy), and also the per-example draws (timesteps, noise images, label dropout, which
images of a unit; see `dpsgd.hidden_generator` for why a `--seed` there would break the bound).

Checkpoints and resume. With a `WorkState`, the model, its EMA, Adam's state and
`DPSGD.steps_done` are saved every `checkpoint_every` seconds and after the last step -- always
after a step's update, so a checkpoint holding k is exactly the state after k noisy updates. A
resumed fit restores it and runs only the T - k charged steps left (with fresh OS entropy for
every draw, as any step has), so the published model has taken exactly T noisy steps, as charged;
`DPSGD` refuses a step past T. Steps that an interrupted attempt computed after its last
checkpoint are dropped and redone. That is sound: their noisy gradients were never released (only
the final model is published; the work folder stays with the owner), and redoing a step from the
same state with fresh randomness draws it from the same distribution, so the output is
distributed as an uninterrupted fit's and the certificate is the same. This assumes the
interruption does not depend on what the dropped steps computed (Ctrl-C, kill -9, power loss;
timing side channels aside). A step that fails *because of* the private data (a non-finite
gradient) is the exception: retrying would redraw batches until one avoids the culprit, a
selection on private data that the accounting does not cover, so the fit is marked and `resume`
refuses it.

Data-parallel under torchrun (`DPSGD(sharded=True)`): every rank takes its share of each step's
Poisson sample of units, the clipped sums are all-reduced with rank 0's noise in them, and every
rank applies the same update (checked at the end: the ranks' weights must be identical). A
non-finite gradient on any rank stops every rank, and rank 0 (which alone keeps the `WorkState`)
marks the fit as not resumable.
"""
from __future__ import annotations

import copy

import torch

from privsynth import distributed
from privsynth.checkpoint import WorkState
from privsynth.data import ImageSet, scaled
from privsynth.errors import BudgetError
from privsynth.generators import ema_update
from privsynth.generators.privimage import unet
from privsynth.generators.privimage.config import Config
from privsynth.privacy import Budget, Charge, NoiseSource
from privsynth.privacy.dpsgd import (DPSGD, PerSampleGradients, clipped_sum, hidden_generator,
                                    unit_members, unit_passes)
from privsynth.progress import Progress

STATE = "dpsgd"  # the training checkpoint's state name
STOPPED = "dpsgd-stopped.json"  # written when a step failed because of the private data


def finetune(model: torch.nn.Module, priv: ImageSet, budget: Budget, charge: Charge, cfg: Config,
             *, units: int | None = None, device: str = "cpu",
             progress: Progress | None = None, state: WorkState | None = None) -> torch.nn.Module:
    """DP-SGD on the private images (over `units` privacy units, when `priv.units` names them);
    returns the EMA of the fine-tuned weights. With `state`, continues from its checkpoint."""
    stopped = state.load_json(STOPPED) if state else None
    if stopped:
        raise BudgetError(f"this fit's DP-SGD stopped because of the private data "
                          f"({stopped['reason']}); resuming would select batches that avoid it. "
                          f"Delete {state.folder} and fit again (the spend stays recorded)")
    classes, m = len(priv.classes), cfg.noise_draws
    ema = copy.deepcopy(model).requires_grad_(False)
    gen = hidden_generator()
    saved = state.load(STATE) if state else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
    grads = PerSampleGradients(model, cfg.grad_sample_mode)
    opt = torch.optim.Adam(grads.params, lr=cfg.dp_lr)
    if saved is not None:
        opt.load_state_dict(saved["opt"])
    mech = DPSGD(budget, charge, expected_batch=cfg.dp_batch, noise=NoiseSource(),
                 steps_done=0 if saved is None else int(saved["steps_done"]), sharded=True)
    alpha_bar = unet.schedule(device)
    loss = lambda net, x, t, y, e: unet.denoising_loss(net, x, t, y, e, alpha_bar)  # noqa: E731
    groups = unit_members(priv.units, len(priv), units)
    for batch in mech.batches(len(groups)):
        sums = [torch.zeros_like(p) for p in grads.params]
        failed = None
        for idx, owners in unit_passes(groups, distributed.shard(batch), cap=cfg.unit_images,
                                       per_pass=cfg.physical_batch, generator=gen):
            idx = torch.from_numpy(idx)
            x = scaled(priv.images[idx]).repeat_interleave(m, 0).to(device)
            y = unet.drop_labels(priv.labels[idx].repeat_interleave(m, 0), classes,
                                 cfg.label_dropout, gen)
            t, eps = unet.loss_draws(x, gen, cfg.t_max)
            rows = grads(loss, x, t, y.to(device), eps, group=m)
            try:
                sums = [s + c for s, c in zip(sums, _clipped(rows, cfg.clip, owners, state))]
            except BudgetError as exc:  # a non-finite gradient: caused by the private data
                failed = exc
                break
        _stop_if(distributed.first_error(failed), state)  # a failure on any rank stops all
        for p, g in zip(grads.params, mech.noisy_gradient(sums)):
            p.grad = g
        opt.step()
        ema_update(ema, model, cfg.ema)
        if state and (state.due() or mech.steps_done == charge.steps):
            state.save(STATE, {"model": model.state_dict(), "ema": ema.state_dict(),
                               "opt": opt.state_dict(), "steps_done": mech.steps_done})
        if progress and (mech.steps_done % 10 == 0 or mech.steps_done == charge.steps):
            progress(f"DP-SGD fine-tuning (batch {len(batch)})", mech.steps_done, charge.steps)
    grads.close()
    distributed.check_same(distributed.digest(list(ema.state_dict().values())), RuntimeError(
        "the ranks' fine-tuned weights differ after DP-SGD (they must stay identical)"))
    return ema


def _clipped(rows: list[torch.Tensor], bound: float, owners: torch.Tensor,
             state: WorkState | None) -> list[torch.Tensor]:
    """`clipped_sum`, marking the fit as not resumable if the private data made it fail."""
    try:
        return clipped_sum(rows, bound, owners=owners)
    except BudgetError as exc:
        if state:
            state.save_json(STOPPED, {"reason": str(exc)})
        raise


def _stop_if(error: BudgetError | None, state: WorkState | None) -> None:
    """Raise `error`, a failure of this step on some rank; rank 0 (the one with `state`) marks
    the fit as not resumable even when another rank failed."""
    if error is None:
        return
    if state:
        state.save_json(STOPPED, {"reason": str(error)})
    raise error
