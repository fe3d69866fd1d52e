"""Train a DCGAN on an image folder and write the generator as a servable checkpoint.

    python -m training.train_gan --data data/digits/train --out runs/gan --epochs 20

Any folder of images works (class folders are read as one unlabeled pool). Each step is two
updates: the discriminator on real + fake images, then the generator (non-saturating loss).
Each epoch draws a grid of the generator's images from the same fixed latent vectors to
`samples/epoch_NNN.png` (`samples.png` is the latest) and records the losses and the
discriminator's mean output on real and fake images in metrics.csv / curves.png. With
--score-classifier (a classifier trained on the same kind of images, e.g. runs/digits from
scripts/demo.sh) each epoch also gets the Inception Score of --score-samples samples computed
with that classifier, next to the score of the real images. `model.pt` is the generator after
the last epoch; model.json's arch_args hold the latent size the generator handler needs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from model_defs import get_entry
from model_defs.generative import dcgan_discriminator, latent_vectors
from model_defs.preprocessing import eval_transform
from training import engine
from training.args import add_data_args, add_engine_args, add_model_args, task_parser
from training.draw import save_samples
from training.scores import InceptionScorer
from training.unlabeled import UnlabeledImages, find_images, unlabeled_record


class GAN(engine.Task):
    name, metric_name, drop_last = "generation", "sample grid", True
    panels = {
        "loss": ["train_d_loss", "train_g_loss"],
        "discriminator output": ["train_d_real", "train_d_fake"],
        "Inception Score (score classifier)": ["val_inception_score"],
    }

    def parser(self) -> argparse.ArgumentParser:
        p = task_parser(self)
        add_data_args(p, "folder of training images, searched recursively", val=False)
        g = add_model_args(p, "generation", "dcgan", input_size="generated image side, a power of two", hflip=None)
        g.add_argument("--latent-dim", type=int, default=64, help="length of the latent vector z (default: 64)")
        g.add_argument(
            "--width",
            type=int,
            default=64,
            help="channels of the generator's last and the discriminator's first layer (default: 64)",
        )
        g.add_argument(
            "--beta1", type=float, default=0.5, help="Adam beta1 of both networks (default: 0.5, as in DCGAN)"
        )
        g.add_argument("--grid-size", type=int, default=64, help="images in each epoch's sample grid (default: 64)")
        g.add_argument(
            "--grid-seed", type=int, default=0, help="seed of the sample grid's fixed latent vectors (default: 0)"
        )
        g.add_argument(
            "--score-classifier",
            default=None,
            help="a trained classifier's output folder (e.g. runs/digits) that scores each epoch's samples: "
            "Inception Score computed with it, and the classes it sees (default: None: no score)",
        )
        g.add_argument(
            "--score-samples", type=int, default=1000, help="generated images scored per epoch (default: 1000)"
        )
        # DCGAN's schedule: Adam (no weight decay) at a constant learning rate.
        return add_engine_args(
            p, epochs=20, batch_size=64, lr=2e-4, weight_decay=0.0, warmup_epochs=0.0, min_lr_ratio=1.0
        )

    def check(self, args) -> None:
        if args.input_size is not None and args.input_size & (args.input_size - 1):
            raise engine.UsageError(f"--input-size must be a power of two >= 8, got {args.input_size}")
        if not 0 <= args.beta1 < 1:
            raise engine.UsageError(f"--beta1 must be >= 0 and < 1, got {args.beta1}")

    def setup(self, args) -> None:
        entry = get_entry(args.model, task="generation")
        size = args.input_size or entry.data_config.input_size
        self.cfg = cfg = entry.data_config.replace(channels=args.channels, input_size=size, resize_size=size)
        shape = {"channels": cfg.channels, "image_size": size, "width": args.width}  # both networks'
        self.model, arch_args = engine.build_model(
            args.model, "generation", args.model_arg, latent_dim=args.latent_dim, **shape
        )
        self.extra_modules = {"disc": dcgan_discriminator(**shape)}
        self.optimizer_kwargs = {name: {"betas": (args.beta1, 0.999)} for name in ("model", "disc")}
        paths = find_images(args.data)
        self.scorer = InceptionScorer(args.score_classifier, cfg) if args.score_classifier else None
        # The training images go through the same resize/crop/normalize the data config names.
        load = self.cache.image_loader(cfg)
        self.train_set = UnlabeledImages(paths, cfg.channels, eval_transform(cfg), load=load)
        self.fixed_z = latent_vectors(args.grid_seed, args.grid_size, args.latent_dim)
        self.score_z = latent_vectors(args.grid_seed + 1, args.score_samples, args.latent_dim)
        self.meta = self.record(args, arch_args, cfg, [], unlabeled_record(args.data, paths))
        self.details = [f"{cfg.channels}x{size}px", f"latent {args.latent_dim}"]
        if self.scorer is not None:
            real = self.scorer.reference(self.train_set, args.score_samples)
            self.metric_name = "inception_score"
            self.extra_metrics = {
                "score_classifier": str(Path(args.score_classifier).resolve()),
                "real_inception_score": real["inception_score"],
            }
            engine.log(
                f"real images: Inception Score {real['inception_score']:.2f}, {real['classes_covered']}/"
                f"{len(self.scorer.classes)} classes (the reference for the samples)"
            )

    def probe_input(self):
        return self.fixed_z

    def step(self, batch, models, update):
        gen, disc, n = models["model"], models["disc"], len(batch)
        fake = gen(torch.randn(n, self.args.latent_dim, device=batch.device))
        logits = disc(torch.cat([batch, fake.detach()])).float()  # one pass: DDP allows one forward per backward
        real_logits, fake_logits = logits[:n], logits[n:]
        d_loss = F.binary_cross_entropy_with_logits(
            real_logits, torch.ones_like(real_logits)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        update(d_loss, "disc")
        gen_logits = disc(fake).float()
        g_loss = F.binary_cross_entropy_with_logits(gen_logits, torch.ones_like(gen_logits))
        update(g_loss, "model")
        return n, {
            "d_loss": d_loss.item(),
            "g_loss": g_loss.item(),
            "d_real": torch.sigmoid(real_logits).mean().item(),
            "d_fake": torch.sigmoid(fake_logits).mean().item(),
        }

    def evaluate(self, gen) -> dict:
        """The epoch's sample grid (generator in eval mode, as served) and its score."""
        out = Path(self.args.out)
        grid = out / "samples" / f"epoch_{self.epoch:03d}.png"
        grid.parent.mkdir(exist_ok=True)
        save_samples(gen(self.fixed_z.to(self.device)).float().cpu(), self.cfg, grid)
        (out / "samples.png").write_bytes(grid.read_bytes())
        result = {"sample_grid": str(grid.relative_to(out))}
        if self.scorer is not None:
            result.update(
                self.scorer(torch.cat([gen(z.to(self.device)).float().cpu() for z in self.score_z.split(256)]))
            )
        return result


cli, get_args_parser = engine.entry_points(GAN)

if __name__ == "__main__":
    sys.exit(cli())
