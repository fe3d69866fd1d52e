"""Send an image to a served detector or segmenter and draw its answer over the image.

    scripts/visualize --model shapes photo.jpg                 # writes photo_shapes.png
    scripts/visualize --model shapes photo.jpg --score-threshold 0.3 --out boxes.png

A detector's answer ([{"label", "score", "box"}]) is drawn as labelled boxes; a segmenter's
({"mask": base64 PNG of class indices, "classes": [...]}) as a coloured overlay with a
legend. The kind of answer decides the drawing, so any served model of those two tasks works.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from model_defs.preprocessing import ImageDecodeError, load_image
from scripts.serve import ROOT, ServeError, TorchServe
from training.draw import draw_detections, draw_mask, enlarge_small


def render(image: Image.Image, answer) -> Image.Image:
    """The picture for one REST answer; ValueError for an answer of another kind."""
    if isinstance(answer, list):
        return draw_detections(*enlarge_small(image, answer))  # boxes are in the sent image's pixels
    if isinstance(answer, dict) and "mask" in answer:
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]))))
        classes = answer.get("classes") or [str(i) for i in range(int(mask.max()) + 1)]
        return draw_mask(image, mask, list(classes))
    raise ValueError(f"the answer is neither detections nor a mask: {str(answer)[:200]}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="image file to send")
    p.add_argument("--model", required=True, help="served model name (required)")
    p.add_argument("--out", default=None, help="PNG to write (default: <image stem>_<model>.png next to the image)")
    p.add_argument("--run-dir", default=str(ROOT / ".serve"), help="the server's run folder, for its address and token (default: .serve/)")
    p.add_argument("--score-threshold", type=float, default=None, help="detectors: lowest score drawn (default: the model's configured one)")
    p.add_argument("--max-detections", type=int, default=None, help="detectors: most boxes drawn (default: the model's configured one)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    path = Path(args.image)
    out = Path(args.out) if args.out else path.with_name(f"{path.stem}_{args.model}.png")
    try:
        data = path.read_bytes()
        image = load_image(data, 3)
        ts = TorchServe(run_dir=Path(args.run_dir))
        fields = {k: str(v) for k, v in (("score_threshold", args.score_threshold),
                                         ("max_detections", args.max_detections)) if v is not None}
        r = requests.post(f"{ts.url('inference')}/predictions/{args.model}", headers=ts.headers("inference"),
                          files={"data": (path.name, data)}, data=fields, timeout=120)
        if r.status_code != 200:
            raise ValueError(f"TorchServe answered {r.status_code}: {r.text.strip()[:300]}")
        render(image, r.json()).save(out)
    except (OSError, ImageDecodeError, ServeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except requests.RequestException as e:
        print(f"error: request to TorchServe failed: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
