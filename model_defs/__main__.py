"""`python -m model_defs`: list every registered model, its task and input size, one per line."""

from model_defs import get_entry, list_models


def main() -> None:
    for name in list_models():
        entry = get_entry(name)
        print(f"{name}\t{entry.task}\t{entry.data_config.channels}x{entry.data_config.input_size}px\t{entry.doc}")


if __name__ == "__main__":
    main()
