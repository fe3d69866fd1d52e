"""Train a SimCLR image encoder contrastively (NT-Xent) on an unlabeled image folder.

    python -m training.train_simclr --data data/digits/train --eval-data data/digits/train \\
        --eval-val-data data/digits/test --channels 1 --hflip-prob 0 --out runs/simclr

No labels are used for training. With --eval-data (a labeled dataset in any layout the
classifier trainer reads) each epoch reports k-NN accuracy: the embeddings of --eval-data
are the memory bank and those of --eval-val-data (or a held-out share of --eval-data) are
classified by a cosine-weighted vote of their k nearest neighbours. Epoch 0 is the
untrained encoder, the baseline the training has to beat. `model.pt` is the encoder of the
best epoch (the last one without --eval-data); the embedder handler serves its L2-normalized
representation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from model_defs import get_entry, get_model
from model_defs.checkpoint import atomic_write_bytes, read_meta, save_model_files
from model_defs.embedding import nt_xent_loss
from model_defs.preprocessing import eval_transform, simclr_view_transform
from training.common import add_run_args, cosine_with_warmup, package_versions, parse_model_args, run_cli, start_run, write_metrics
from training.datasets import LAYOUTS, DatasetError, ImageDataset, collate_skipping, read_dataset, stratified_split
from training.unlabeled import UnlabeledImages, collate_images, find_images, fingerprint


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="folder of unlabeled training images, searched recursively (required)")
    g.add_argument("--eval-data", default=None, help="labeled dataset for the k-NN accuracy (memory bank) (default: None: no metric)")
    g.add_argument("--eval-val-data", default=None,
                   help="labeled dataset whose images are classified by k-NN (default: a held-out share of --eval-data)")
    g.add_argument("--eval-val-fraction", type=float, default=0.2,
                   help="share of --eval-data held out as k-NN queries when --eval-val-data is not given (default: 0.2)")
    g.add_argument("--layout", default="auto", choices=LAYOUTS, help="layout of the labeled eval datasets (default: auto)")
    g.add_argument("--knn-k", type=int, default=20, help="neighbours that vote in the k-NN accuracy (default: 20)")
    g.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="data-loading processes (default: min(2, cores))")

    g = p.add_argument_group("model and augmentation")
    g.add_argument("--model", default="simclr", help="registered embedding model (default: simclr)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword argument for the model builder, value parsed as YAML, e.g. backbone=resnet18; repeatable (default: none)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None, help="1 = grey, 3 = RGB (default: the model's data config)")
    g.add_argument("--input-size", type=int, default=None, help="image side the encoder sees (default: the model's data config)")
    g.add_argument("--min-scale", type=float, default=0.3, help="smallest area share of a view's random resized crop (default: 0.3)")
    g.add_argument("--hflip-prob", type=float, default=0.5, help="horizontal-flip probability of a view; 0 for digits and text (default: 0.5)")
    g.add_argument("--jitter", type=float, default=0.4, help="colour-jitter strength (brightness, contrast, saturation) (default: 0.4)")
    g.add_argument("--rotation", type=float, default=0.0, help="largest random rotation of a view in degrees (default: 0)")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=20, help="passes over the data (default: 20)")
    g.add_argument("--batch-size", type=int, default=256, help="images per step; each gives two views (default: 256)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: 1e-3)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up before the cosine decay (default: 1.0)")
    g.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature (default: 0.5)")

    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/simclr", help="output folder (default: runs/simclr)")
    add_run_args(g)
    return p


def train_one_epoch(model, loader, optimizer, scheduler, device, temperature, desc, no_progress) -> dict:
    model.train()
    loss_sum, steps, skipped = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=True if no_progress else None, dynamic_ncols=True)
    for views, n_skipped in bar:
        skipped += n_skipped
        if views is None or views[0].shape[0] < 2:
            continue
        v1, v2 = views[0].to(device), views[1].to(device)
        z = model.project(model(torch.cat([v1, v2])))  # one pass: BatchNorm sees both views
        loss = nt_xent_loss(*z.chunk(2), temperature=temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item()
        steps += 1
        bar.set_postfix(loss=f"{loss_sum / steps:.4f}")
    return {"loss": loss_sum / max(1, steps), "skipped": skipped}


@torch.no_grad()
def embed(model: nn.Module, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalized embeddings (as the embedder handler serves them) and their labels."""
    model.eval()
    feats, labels = [], []
    for images, targets, _ in loader:
        if images is None:
            continue
        feats.append(F.normalize(model(images.to(device)).float(), dim=1).cpu())
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
                 k: int, num_classes: int, temperature: float = 0.1) -> float:
    """Cosine k-NN with exp(similarity / T) weighted votes (Wu et al., 2018), top-1 accuracy."""
    sim = query @ bank.T
    top_sim, top_idx = sim.topk(min(k, bank.shape[0]), dim=1)
    votes = torch.zeros(query.shape[0], num_classes)
    votes.scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())
    return (votes.argmax(1) == query_labels).float().mean().item()


def main(args) -> dict:
    device = start_run(args)
    entry = get_entry(args.model, task="embedding")
    cfg = entry.data_config.replace(channels=args.channels, input_size=args.input_size)
    arch_args = {"in_channels": cfg.channels, **parse_model_args(args.model_arg)}
    model = get_model(args.model, **arch_args).to(device)

    paths = find_images(args.data)
    knn = None
    if args.eval_data:
        bank_spec = read_dataset(args.eval_data, args.layout)
        if bank_spec.multi_label:
            raise DatasetError(f"{args.eval_data}: k-NN accuracy needs one label per image")
        if args.eval_val_data:
            bank, query = bank_spec.samples, read_dataset(args.eval_val_data, args.layout, classes=bank_spec.classes).samples
        else:
            bank, query = stratified_split(bank_spec.samples, args.eval_val_fraction, args.seed)
        n = len(bank_spec.classes)
        tf = eval_transform(cfg)
        kw = dict(batch_size=256, shuffle=False, num_workers=args.workers, collate_fn=collate_skipping)
        knn = (DataLoader(ImageDataset(bank, n, False, cfg.channels, tf), **kw),
               DataLoader(ImageDataset(query, n, False, cfg.channels, tf), **kw), n)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be good

    view = simclr_view_transform(cfg, min_scale=args.min_scale, hflip_prob=args.hflip_prob,
                                 jitter=args.jitter, rotation=args.rotation)
    dataset = UnlabeledImages(paths, cfg.channels, view, views=2)
    drop_last = len(dataset) > args.batch_size
    steps_per_epoch = len(dataset) // args.batch_size if drop_last else 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = cosine_with_warmup(optimizer, round(args.warmup_epochs * steps_per_epoch),
                                   args.epochs * steps_per_epoch, 0.01)

    def evaluate() -> float | None:
        if knn is None:
            return None
        bank_f, bank_y = embed(model, knn[0], device)
        query_f, query_y = embed(model, knn[1], device)
        return knn_accuracy(bank_f, bank_y, query_f, query_y, args.knn_k, knn[2])

    meta = {
        "arch": args.model,
        "arch_args": arch_args,
        "task": "embedding",
        "classes": [],
        "embedding_dim": model.feature_dim,
        "preprocessing": cfg.to_dict(),
        "dataset": {"root": str(Path(args.data).resolve()), "layout": "unlabeled images", "train_images": len(paths),
                    "fingerprint": fingerprint(args.data, paths), "eval_data": args.eval_data,
                    "eval_val_data": args.eval_val_data or (f"stratified {args.eval_val_fraction} of --eval-data" if args.eval_data else None)},
        "versions": package_versions(),
    }
    print(f"{args.model}: {len(paths)} unlabeled images, {cfg.channels}x{cfg.input_size}px, "
          f"embedding dim {model.feature_dim}, on {device}", file=sys.stderr)
    baseline = evaluate()
    if baseline is not None:
        print(f"epoch 0 (untrained)  k-NN accuracy {baseline:.4f}", file=sys.stderr)
    history, best = [], (-1.0, 0)
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        torch.manual_seed(args.seed + epoch)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=drop_last,
                            generator=torch.Generator().manual_seed(args.seed + epoch),
                            num_workers=args.workers, collate_fn=collate_images)
        tr = train_one_epoch(model, loader, optimizer, scheduler, device, args.temperature,
                             f"epoch {epoch}/{args.epochs}", args.no_progress)
        acc = evaluate()
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": tr["loss"],
               "knn_accuracy": acc if acc is not None else float("nan"), "skipped_images": tr["skipped"],
               "seconds": round(time.time() - start, 2)}
        history.append(row)
        improved = acc is None or acc > best[0]
        if improved:
            best = (acc if acc is not None else float("nan"), epoch)
            meta["metrics"] = {"name": "knn_accuracy" if acc is not None else "nt_xent_loss", "knn_k": args.knn_k,
                               "best_val": acc, "best_epoch": epoch, "untrained_knn_accuracy": baseline,
                               "train_loss": tr["loss"]}
            meta["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            save_model_files(out, model, meta)
        panels = {"NT-Xent loss": ["train_loss"]}
        if acc is not None:
            panels["k-NN accuracy"] = ["knn_accuracy"]
        write_metrics(out, history, panels)
        shown = f"  k-NN accuracy {acc:.4f}{' *' if improved else ''}" if acc is not None else ""
        print(f"epoch {epoch}/{args.epochs}  NT-Xent loss {tr['loss']:.4f}{shown}  {row['seconds']:.1f}s", file=sys.stderr)
    # model.json describes model.pt (the best epoch) and the whole run's length.
    final = read_meta(out)
    final["metrics"].update(epochs_run=len(history), skipped_images=sum(h["skipped_images"] for h in history))
    atomic_write_bytes(out / "model.json", (json.dumps(final, indent=2) + "\n").encode())
    if baseline is not None:
        print(f"best k-NN accuracy {best[0]:.4f} at epoch {best[1]} (untrained {baseline:.4f}); wrote {out}/model.pt",
              file=sys.stderr)
    return final


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
