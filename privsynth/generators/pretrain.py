"""PrivImage step 2: pretrain the class-conditional denoiser on the selected public classes.

Public images only, so no privacy cost: the images of the public classes chosen for private class
i are relabelled i. Seeded by `--seed` (public randomness). With a `WorkState`, the model, Adam's
state and the generator are saved every `checkpoint_every` seconds and when done, and a resumed
fit continues from there (and skips pretraining once it is done).

Under torchrun the model is wrapped in torch DistributedDataParallel: each rank draws its share of
every batch of `pretrain_batch` images from its own stream (rank 0's is the one-process stream),
and backward averages the gradients over the ranks, so each step is the mean over the whole batch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from privsynth import distributed
from privsynth.checkpoint import WorkState
from privsynth.data import ImageSet
from privsynth.generators import semantic, unet

if TYPE_CHECKING:
    from privsynth.generators.privimage import Config

Progress = Callable[[str, int, int], None]
STATE = "pretrain"  # the state's name in the work folder


def pretrain(shape: unet.UNetConfig, public_set: Callable[[], ImageSet], chosen: list[list[int]],
             cfg: Config, *, seed: int = 0, device: str = "cpu", progress: Progress | None = None,
             state: WorkState | None = None) -> torch.nn.Module:
    """The denoiser `shape` trained on the public images of the `chosen` classes, relabelled;
    `public_set` is called only if there is training left to do."""
    torch.manual_seed(seed)
    model = unet.build(shape).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
    gen = distributed.generator(seed)
    rows = distributed.share(cfg.pretrain_batch, "privimage.pretrain_batch")
    saved = state.load(STATE) if state else None
    first = 0 if saved is None else int(saved["step"])
    if saved is not None:
        model.load_state_dict(saved["model"])
        if first >= cfg.pretrain_steps:
            return model
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["generator"])
    x_all, y_all = _relabelled(public_set(), chosen)
    net = distributed.data_parallel(model)  # DDP: backward averages the gradients over ranks
    alpha_bar = unet.schedule(device)
    for step in range(first, cfg.pretrain_steps):
        if state and step > first and state.due():
            state.save(STATE, {"model": model.state_dict(), "opt": opt.state_dict(),
                               "generator": gen.get_state(), "step": step})
        idx = torch.randint(len(x_all), (rows,), generator=gen)
        x = x_all[idx].to(device)
        y = unet.drop_labels(y_all[idx], shape.classes, cfg.label_dropout, gen)
        t, eps = unet.loss_draws(x, gen)
        loss = unet.denoising_loss(net, x, t, y.to(device), eps, alpha_bar).sum()
        loss = loss / (cfg.pretrain_batch / distributed.world())  # with DDP's average: batch mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and ((step + 1) % 10 == 0 or step + 1 == cfg.pretrain_steps):
            progress(f"pretraining on public images (loss {loss.item():.3f})", step + 1,
                     cfg.pretrain_steps)
    if state:
        state.save(STATE, {"model": model.state_dict(), "step": cfg.pretrain_steps})
    return model


def _relabelled(pub: ImageSet, chosen: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of the chosen public classes, scaled to [-1, 1], labelled by private class."""
    relabel = torch.full((len(pub.classes),), -1, dtype=torch.long)
    for i, js in enumerate(chosen):
        relabel[js] = i
    labels = relabel[pub.labels]
    keep = labels >= 0
    return semantic.scaled(pub.images[keep]), labels[keep]
