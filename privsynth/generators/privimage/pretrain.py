"""PrivImage step 2: pretrain the class-conditional denoiser on public images, then on drafts.

No privacy cost: the public images of the classes chosen for private class i are relabelled i
(`pretrain`); the drafts are images of the DP draft generator, already labelled (`on_drafts`,
post-processing). Seeded by `--seed` (public randomness). Only timesteps below `Config.t_max` are
trained. With a `WorkState`, the model, Adam's state and the generator are saved every
`checkpoint_every` seconds and when done, under the stage's name; a resumed fit continues from
there (and skips a stage once it is done).

Under torchrun the model is wrapped in torch DistributedDataParallel: each rank draws its share of
every batch of `pretrain_batch` images from its own stream (rank 0's is the one-process stream),
and backward averages the gradients over the ranks, so each step is the mean over the whole batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from privsynth import distributed
from privsynth.checkpoint import WorkState
from privsynth.data import ImageSet, scaled
from privsynth.generators.privimage import unet
from privsynth.generators.privimage.config import Config
from privsynth.progress import Progress

STATE = "pretrain"  # the public stage's state name in the work folder
DRAFT_STATE = "draft-pretrain"  # the draft stage's
Images = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # () -> (x in [-1, 1], labels)


def pretrain(shape: unet.UNetConfig, public_set: Callable[[], ImageSet], chosen: list[list[int]],
             cfg: Config, *, seed: int = 0, device: str = "cpu", progress: Progress | None = None,
             state: WorkState | None = None) -> torch.nn.Module:
    """The denoiser `shape` trained on the public images of the `chosen` classes, relabelled;
    `public_set` is called only if there is training left to do."""
    torch.manual_seed(seed)
    model = unet.build(shape).to(device)
    return train(model, lambda: _relabelled(public_set(), chosen), cfg.pretrain_steps, cfg,
                 seed=seed, device=device, progress=progress, state=state, name=STATE,
                 what="pretraining on public images")


def on_drafts(model: torch.nn.Module, drafts: Images, cfg: Config, *, seed: int = 0,
              device: str = "cpu", progress: Progress | None = None,
              state: WorkState | None = None) -> torch.nn.Module:
    """`model` trained further on the labelled drafts (`drafts()`, called only if needed)."""
    return train(model, drafts, cfg.draft_steps, cfg, seed=seed + 1, device=device,
                 progress=progress, state=state, name=DRAFT_STATE, what="pretraining on drafts")


def train(model: torch.nn.Module, images: Images, steps: int, cfg: Config, *, seed: int,
          device: str, progress: Progress | None, state: WorkState | None, name: str,
          what: str) -> torch.nn.Module:
    """`steps` Adam updates of the DDPM loss (timesteps below cfg.t_max) on batches of
    `cfg.pretrain_batch` drawn with replacement from `images()`; resumable under `name`."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
    gen = distributed.generator(seed)
    rows = distributed.share(cfg.pretrain_batch, "privimage.pretrain_batch")
    saved = state.load(name) if state else None
    first = 0 if saved is None else int(saved["step"])
    if saved is not None:
        model.load_state_dict(saved["model"])
    if first >= steps:  # done (a finished stage's state holds only the model)
        return model
    if saved is not None:
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["generator"])
    x_all, y_all = images()
    net = distributed.data_parallel(model)  # DDP: backward averages the gradients over ranks
    alpha_bar = unet.schedule(device)
    classes = model.config.num_class_embeds - 1
    for step in range(first, steps):
        if state and step > first and state.due():
            state.save(name, {"model": model.state_dict(), "opt": opt.state_dict(),
                              "generator": gen.get_state(), "step": step})
        idx = torch.randint(len(x_all), (rows,), generator=gen)
        x = x_all[idx].to(device)
        y = unet.drop_labels(y_all[idx], classes, cfg.label_dropout, gen)
        t, eps = unet.loss_draws(x, gen, cfg.t_max)
        loss = unet.denoising_loss(net, x, t, y.to(device), eps, alpha_bar).sum()
        loss = loss / (cfg.pretrain_batch / distributed.world())  # with DDP's average: batch mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and ((step + 1) % 10 == 0 or step + 1 == steps):
            progress(f"{what} (loss {loss.item():.3f})", step + 1, steps)
    if state:
        state.save(name, {"model": model.state_dict(), "step": steps})
    return model


def _relabelled(pub: ImageSet, chosen: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of the chosen public classes, scaled to [-1, 1], labelled by private class."""
    relabel = torch.full((len(pub.classes),), -1, dtype=torch.long)
    for i, js in enumerate(chosen):
        relabel[js] = i
    labels = relabel[pub.labels]
    keep = labels >= 0
    return scaled(pub.images[keep]), labels[keep]
