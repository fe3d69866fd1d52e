"""Train a SimCLR image encoder contrastively (NT-Xent) on an unlabeled image folder.

    python -m training.train_simclr --data data/digits/train --eval-data data/digits/train \\
        --eval-val-data data/digits/test --channels 1 --hflip-prob 0 --out runs/simclr

No labels are used for training. With --eval-data (a labeled dataset in any layout the
classifier trainer reads) each epoch reports k-NN accuracy: the embeddings of --eval-data
are the memory bank and those of --eval-val-data (or a held-out share of --eval-data) are
classified by a cosine-weighted vote of their k nearest neighbours. The untrained encoder's
accuracy is the baseline the training has to beat. `model.pt` is the encoder of the best
epoch (the last one without --eval-data); the embedder handler serves its L2-normalized
representation.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from model_defs import get_entry
from model_defs.checkpoint import unwrap
from model_defs.embedding import nt_xent_loss
from model_defs.preprocessing import eval_transform, simclr_view_transform
from training import engine
from training.args import add_data_args, add_engine_args, add_model_args, add_rotation_arg, task_parser
from training.datasets import LAYOUTS, DatasetError, ImageDataset, read_dataset, split_source, stratified_split
from training.scores import knn_accuracy
from training.unlabeled import UnlabeledImages, find_images, unlabeled_record


class SimCLR(engine.Task):
    name, metric_name = "embedding", "nt_xent_loss"
    panels = {"NT-Xent loss": ["train_loss"], "k-NN accuracy": ["val_knn_accuracy"]}

    def parser(self) -> argparse.ArgumentParser:
        p = task_parser(self)
        g = add_data_args(
            p,
            "folder of unlabeled training images, searched recursively",
            LAYOUTS,
            "layout of the labeled eval datasets",
            val=False,
        )
        g.add_argument(
            "--eval-data",
            default=None,
            help="labeled dataset for the k-NN accuracy (memory bank) (default: None: no metric)",
        )
        g.add_argument(
            "--eval-val-data",
            default=None,
            help="labeled dataset whose images are classified by k-NN (default: a held-out share of --eval-data)",
        )
        g.add_argument(
            "--eval-val-fraction",
            type=float,
            default=0.2,
            help="share of --eval-data held out as k-NN queries when --eval-val-data is not given (default: 0.2)",
        )
        g.add_argument("--knn-k", type=int, default=20, help="neighbours that vote in the k-NN accuracy (default: 20)")
        g = add_model_args(
            p,
            "embedding",
            "simclr",
            example="backbone=resnet18",
            input_size="image side the encoder sees",
            min_scale=0.3,
        )
        g.add_argument(
            "--jitter",
            type=float,
            default=0.4,
            help="colour-jitter strength (brightness, contrast, saturation) (default: 0.4)",
        )
        add_rotation_arg(g)
        g.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature (default: 0.5)")
        return add_engine_args(p, epochs=20, batch_size=256, lr=1e-3)

    def setup(self, args) -> None:
        self.cfg = cfg = get_entry(args.model, task="embedding").data_config.replace(
            channels=args.channels, input_size=args.input_size
        )
        self.model, arch_args = engine.build_model(args.model, "embedding", args.model_arg, in_channels=cfg.channels)
        paths = find_images(args.data)
        load = self.cache.image_loader(cfg)
        self.knn = None
        if args.eval_data:
            spec = read_dataset(args.eval_data, args.layout)
            if spec.multi_label or len(spec.classes) < 2:
                raise DatasetError(
                    f"--eval-data {args.eval_data} (layout {spec.layout}): k-NN accuracy needs one label per image "
                    f"and at least 2 classes; it has {len(spec.classes)}"
                )
            if args.eval_val_data:
                bank, query = spec.samples, read_dataset(args.eval_val_data, args.layout, classes=spec.classes).samples
            else:
                bank, query = stratified_split(spec.samples, args.eval_val_fraction, args.seed)
            tf = eval_transform(cfg)
            self.knn = [ImageDataset(s, len(spec.classes), False, cfg.channels, tf, load) for s in (bank, query)]
            self.val_set, self.monitor, self.metric_name = self.knn[1], "knn_accuracy", "knn_accuracy"
        view = simclr_view_transform(
            cfg, min_scale=args.min_scale, hflip_prob=args.hflip_prob, jitter=args.jitter, rotation=args.rotation
        )
        self.train_set = UnlabeledImages(paths, cfg.channels, view, views=2, load=load)
        self.drop_last = True
        dataset = unlabeled_record(args.data, paths) | {"eval_data": args.eval_data}
        if args.eval_data:
            split = split_source(args.eval_val_fraction, args.seed, of="--eval-data")
            dataset |= {"eval_fingerprint": spec.fingerprint(), "eval_val_data": args.eval_val_data or split}
        self.meta = self.record(args, arch_args, cfg, [], dataset, embedding_dim=self.model.feature_dim)
        self.details = [f"{cfg.channels}x{cfg.input_size}px", f"embedding dim {self.model.feature_dim}"]
        if self.knn and engine.dist.is_main():
            self.model.to(self.device)
            baseline = self.evaluate(self.model.eval())["knn_accuracy"]
            self.extra_metrics = {"knn_k": args.knn_k, "untrained_knn_accuracy": baseline}
            engine.log(f"untrained encoder: k-NN accuracy {baseline:.4f}")

    def datasets(self) -> list:
        return [self.train_set, *(self.knn or [])]

    def step(self, batch, models, update):
        v1, v2 = batch
        if len(v1) < 2:
            return 0, {}
        model = models["model"]
        z = unwrap(model).project(model(torch.cat([v1, v2])))  # one pass: BatchNorm sees both views
        loss = nt_xent_loss(*z.float().chunk(2), temperature=self.args.temperature)
        update(loss)
        return len(v1), {"loss": loss.item()}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        if not self.knn:
            return {}
        (bank, bank_y), (query, query_y) = (self.embed(model, d) for d in self.knn)
        return {"knn_accuracy": knn_accuracy(bank, bank_y, query, query_y, self.args.knn_k, self.knn[0].num_classes)}

    def embed(self, model, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalized embeddings (as the embedder handler serves them) and their labels."""
        feats, labels = [], []
        for images, targets in self.batches(self.loader(dataset), "k-NN"):
            feats.append(F.normalize(model(images).float(), dim=1).cpu())
            labels.append(targets.cpu())
        return torch.cat(feats), torch.cat(labels)


cli, get_args_parser = engine.entry_points(SimCLR)

if __name__ == "__main__":
    sys.exit(cli())
