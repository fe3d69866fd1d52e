"""Train a DCGAN on an image folder and write the generator as a servable checkpoint.

    python -m training.train_gan --data data/digits/train --out runs/gan --epochs 20

Any folder of images works (class folders are read as one unlabeled pool). Each epoch
draws a grid of the generator's images from the same fixed latent vectors to
`samples/epoch_NNN.png` (so progress is visible epoch to epoch; `samples.png` is the
latest) and records the losses and the discriminator's mean output on real and fake
images in metrics.csv / curves.png. With --score-classifier (a classifier trained on the
same kind of images, e.g. runs/digits from scripts/demo.sh) each epoch also gets a number:
the Inception Score of 1,000 samples computed with that classifier, next to the score of
the real images. `model.pt` is the generator's state_dict after the last epoch;
model.json's arch_args hold the latent size the generator handler needs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from tqdm import tqdm

from model_defs import get_entry, get_model
from model_defs.checkpoint import data_config_from_meta, load_trained, save_model_files
from model_defs.generative import dcgan_discriminator, latent_vectors
from model_defs.preprocessing import eval_transform, tensor_to_images, to_model_mode
from training.common import add_run_args, package_versions, run_cli, start_run, write_metrics
from training.unlabeled import UnlabeledImages, collate_images, find_images, fingerprint


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of training images, searched recursively (required)")
    p.add_argument("--model", default="dcgan", help="registered generation model (default: dcgan)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 = grey images, 3 = RGB (default: the model's data config, 1)")
    p.add_argument("--image-size", type=int, default=None,
                   help="generated image side, a power of two >= 8 (default: the model's data config, 32)")
    p.add_argument("--latent-dim", type=int, default=64, help="length of the latent vector z (default: 64)")
    p.add_argument("--width", type=int, default=64,
                   help="channels of the generator's last and the discriminator's first layer (default: 64)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the data (default: 20)")
    p.add_argument("--batch-size", type=int, default=64, help="real images per step (default: 64)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of both networks (default: 2e-4, as in DCGAN)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (default: 0.5, as in DCGAN)")
    p.add_argument("--grid-size", type=int, default=64, help="images in each epoch's sample grid (default: 64)")
    p.add_argument("--grid-seed", type=int, default=0, help="seed of the sample grid's fixed latent vectors (default: 0)")
    p.add_argument("--score-classifier", default=None,
                   help="a trained classifier's output folder (e.g. runs/digits) that scores each epoch's samples: "
                        "Inception Score computed with it, and the classes it sees (default: None: no score)")
    p.add_argument("--score-samples", type=int, default=1000, help="generated images scored per epoch (default: 1000)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="data-loading processes (default: min(2, cores))")
    p.add_argument("--out", default="runs/gan", help="output folder (default: runs/gan)")
    add_run_args(p)
    return p


def train_one_epoch(gen, disc, loader, opt_g, opt_d, device, latent_dim, desc, no_progress) -> dict:
    """One pass: a discriminator step on real + fake, then a non-saturating generator step."""
    gen.train()
    disc.train()
    sums = {"d_loss": 0.0, "g_loss": 0.0, "d_real": 0.0, "d_fake": 0.0}
    steps, skipped = 0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=True if no_progress else None, dynamic_ncols=True)
    for real, n_skipped in bar:
        skipped += n_skipped
        if real is None:
            continue
        real = real.to(device)
        n = real.shape[0]
        fake = gen(torch.randn(n, latent_dim, device=device))

        logits_real, logits_fake = disc(real), disc(fake.detach())
        d_loss = (F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
                  + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake)))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        logits_gen = disc(fake)
        g_loss = F.binary_cross_entropy_with_logits(logits_gen, torch.ones_like(logits_gen))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()

        steps += 1
        sums["d_loss"] += d_loss.item()
        sums["g_loss"] += g_loss.item()
        sums["d_real"] += torch.sigmoid(logits_real).mean().item()
        sums["d_fake"] += torch.sigmoid(logits_fake).mean().item()
        bar.set_postfix(d=f"{sums['d_loss'] / steps:.3f}", g=f"{sums['g_loss'] / steps:.3f}")
    return {k: v / max(1, steps) for k, v in sums.items()} | {"skipped": skipped}


@torch.no_grad()
def sample_grid(gen: nn.Module, z: torch.Tensor, cfg, path: Path) -> None:
    """The generator in eval mode (as served) on fixed latents, drawn as one PNG grid."""
    gen.eval()
    images = gen(z.to(next(gen.parameters()).device)).float().cpu()
    mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std).view(1, -1, 1, 1)
    nrow = max(1, round(len(z) ** 0.5))
    torchvision.utils.save_image(images * std + mean, path, nrow=nrow, padding=2, pad_value=1.0)


class SampleScorer:
    """Scores generated images with a trained classifier, the way its handler would see
    them (PNG pixels, its own preprocessing): the Inception Score exp(E[KL(p(y|x) || p(y))]),
    between 1 and the number of classes, high when each image is clearly one class and the
    classes are evenly covered; and how many classes are the top-1 of at least 1% of them."""

    def __init__(self, run_dir: str, gen_cfg):
        self.model, meta = load_trained(run_dir)
        if meta["task"] != "classification":
            raise ValueError(f"--score-classifier {run_dir} is a {meta['task']} model, not a classifier")
        self.cfg = data_config_from_meta(meta)
        self.transform = eval_transform(self.cfg)
        self.classes = meta["classes"]
        self.gen_cfg = gen_cfg

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict:
        pil = tensor_to_images(images, self.gen_cfg)
        x = torch.stack([self.transform(to_model_mode(im, self.cfg.channels)) for im in pil])
        p = torch.cat([torch.softmax(self.model(chunk).float(), 1) for chunk in x.split(256)])
        marginal = p.mean(0, keepdim=True)
        kl = (p * (torch.log(p + 1e-12) - torch.log(marginal + 1e-12))).sum(1)
        share = torch.bincount(p.argmax(1), minlength=p.shape[1]).float() / p.shape[0]
        return {"inception_score": kl.mean().exp().item(), "classes_covered": int((share >= 0.01).sum())}


def main(args) -> dict:
    device = start_run(args)
    entry = get_entry(args.model, task="generation")
    size = args.image_size or entry.data_config.input_size
    cfg = entry.data_config.replace(channels=args.channels, input_size=size, resize_size=size)
    arch_args = {"latent_dim": args.latent_dim, "channels": cfg.channels, "image_size": size, "width": args.width}
    gen = get_model(args.model, **arch_args).to(device)
    disc = dcgan_discriminator(channels=cfg.channels, image_size=size, width=args.width).to(device)

    paths = find_images(args.data)
    scorer = SampleScorer(args.score_classifier, cfg) if args.score_classifier else None
    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be good

    # The training images go through the same resize/crop/normalize the data config names.
    dataset = UnlabeledImages(paths, cfg.channels, eval_transform(cfg))
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    fixed_z = latent_vectors(args.grid_seed, args.grid_size, args.latent_dim)

    meta = {
        "arch": args.model,
        "arch_args": arch_args,
        "task": "generation",
        "classes": [],
        "preprocessing": cfg.to_dict(),
        "dataset": {"root": str(Path(args.data).resolve()), "layout": "unlabeled images",
                    "train_images": len(paths), "fingerprint": fingerprint(args.data, paths)},
        "versions": package_versions(),
    }
    print(f"{args.model}: {len(paths)} images, {cfg.channels}x{size}px, latent {args.latent_dim}, on {device}",
          file=sys.stderr)
    score_z = latent_vectors(args.grid_seed + 1, args.score_samples, args.latent_dim)
    real_score = None
    if scorer is not None:
        # Evenly spread over the sorted files, so class folders are all represented.
        picks = torch.linspace(0, len(dataset) - 1, min(len(dataset), args.score_samples)).round().long().unique()
        real = torch.stack([x for i in picks.tolist() if (x := dataset[i]) is not None])
        real_score = scorer(real)
        print(f"real images: Inception Score {real_score['inception_score']:.2f}, "
              f"{real_score['classes_covered']}/{len(scorer.classes)} classes (the reference for the samples)", file=sys.stderr)
    history = []
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        generator = torch.Generator().manual_seed(args.seed + epoch)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=len(dataset) > args.batch_size,
                            generator=generator, num_workers=args.workers, collate_fn=collate_images)
        tr = train_one_epoch(gen, disc, loader, opt_g, opt_d, device, args.latent_dim,
                             f"epoch {epoch}/{args.epochs}", args.no_progress)
        grid = out / "samples" / f"epoch_{epoch:03d}.png"
        sample_grid(gen, fixed_z, cfg, grid)
        (out / "samples.png").write_bytes(grid.read_bytes())
        row = {"epoch": epoch, "d_loss": tr["d_loss"], "g_loss": tr["g_loss"], "d_real": tr["d_real"],
               "d_fake": tr["d_fake"], "skipped_images": tr["skipped"], "seconds": round(time.time() - start, 2)}
        if scorer is not None:
            gen.eval()
            with torch.no_grad():
                row.update(scorer(torch.cat([gen(z.to(device)).cpu() for z in score_z.split(256)])))
        history.append(row)
        meta["metrics"] = {"name": "sample grid", "sample_grid": f"samples/epoch_{epoch:03d}.png",
                           "epochs_run": epoch, "final_d_loss": tr["d_loss"], "final_g_loss": tr["g_loss"],
                           "final_d_real": tr["d_real"], "final_d_fake": tr["d_fake"],
                           "skipped_images": sum(h["skipped_images"] for h in history)}
        if scorer is not None:
            meta["metrics"].update(name="inception_score", score_classifier=str(Path(args.score_classifier).resolve()),
                                   inception_score=row["inception_score"], classes_covered=row["classes_covered"],
                                   real_inception_score=real_score["inception_score"])
        meta["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        save_model_files(out, gen, meta)
        panels = {"loss": ["d_loss", "g_loss"], "discriminator output": ["d_real", "d_fake"]}
        if scorer is not None:
            panels["Inception Score (score classifier)"] = ["inception_score"]
        write_metrics(out, history, panels)
        scored = (f"  IS {row['inception_score']:.2f}, {row['classes_covered']} classes" if scorer is not None else "")
        print(f"epoch {epoch}/{args.epochs}  D loss {tr['d_loss']:.3f}  G loss {tr['g_loss']:.3f}  "
              f"D(real) {tr['d_real']:.2f}  D(fake) {tr['d_fake']:.2f}{scored}  {row['seconds']:.1f}s  -> {grid}", file=sys.stderr)
    print(f"wrote {out}/model.pt (generator) and model.json; sample grids in {out}/samples/", file=sys.stderr)
    return meta


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
