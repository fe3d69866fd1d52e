"""`python -m model_defs`: list every registered model, its task, input size and parameter
count (at the builder's default arguments: total, and trainable), one per line."""

import torch

from model_defs import get_entry, get_model, list_models
from model_defs.registry import parameter_counts


def parameters(name: str) -> str:
    """Counted on the meta device (nothing allocated), or built for real where a builder
    needs real tensors."""
    try:
        with torch.device("meta"):
            model = get_model(name)
    except (NotImplementedError, RuntimeError):
        model = get_model(name)
    counts = parameter_counts(model)
    return f"{counts['total'] / 1e6:.2f}M params ({counts['trainable'] / 1e6:.2f}M trainable)"


def main() -> None:
    for name in list_models():
        entry = get_entry(name)
        size = f"{entry.data_config.channels}x{entry.data_config.input_size}px"
        print(f"{name}\t{entry.task}\t{size}\t{parameters(name)}\t{entry.doc}")


if __name__ == "__main__":
    main()
