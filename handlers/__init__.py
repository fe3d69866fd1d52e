"""TorchServe handlers: a shared vision base (`vision.py`) and one small file per task."""
