"""Send an image to a served model and draw its answer, or its explanation, over the image.

    scripts/visualize --model shapes photo.jpg                 # writes photo_shapes.png
    scripts/visualize --model shapes photo.jpg --score-threshold 0.3 --out boxes.png
    scripts/visualize --model digits photo.jpg --explain --target 7   # writes photo_digits_explain.png
    scripts/visualize --model vit digit.png --explain --method attention_rollout

A detector's answer ([{"label", "score", "box"}]) is drawn as labelled boxes; a segmenter's
({"mask": base64 PNG of class indices, "classes": [...]}) as a coloured overlay with a
legend. With --explain the image goes to /explanations instead, and the Integrated
Gradients heatmap of a classifier or segmenter is laid over a greyed copy of the image (red:
pixels that raised the target's score, blue: pixels that lowered it), under a line naming
the target, its probability, the steps and the convergence delta; a Vision Transformer's
attention rollout (`--method attention_rollout`) is drawn the same way, red where the class
token's attention flows. The kind of answer decides the drawing.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from pathlib import Path

import numpy as np
import requests
from PIL import Image, ImageDraw

from handlers.options import EXPLAIN_METHODS
from model_defs.preprocessing import ImageDecodeError, load_image
from model_defs.usage import OneLineParser
from scripts.ops.serve import RUN_DIR_HELP, ServeError, TorchServe, default_run_dir
from training.draw import draw_detections, draw_mask, enlarge_small


def draw_explanation(image: Image.Image, answer: dict, target: int = 320) -> Image.Image:
    """The heatmap of an /explanations answer over a greyed copy of the image, with a caption."""
    heat = Image.open(io.BytesIO(base64.b64decode(answer["heatmap"]))).convert("RGBA")
    if heat.size != image.size:
        raise ValueError(f"the heatmap is {heat.width}x{heat.height} but the image is {image.width}x{image.height}")
    zoom = max(1.0, target / max(image.size))  # small images enlarged so the caption stays readable
    size = (round(image.width * zoom), round(image.height * zoom))
    grey = image.convert("L").convert("RGBA").resize(size, Image.Resampling.BILINEAR)
    grey = Image.blend(grey, Image.new("RGBA", size, (255, 255, 255, 255)), 0.3)  # lighter, so colours stand out
    drawn = Image.alpha_composite(grey, heat.resize(size, Image.Resampling.BILINEAR))
    if answer.get("method") == "attention_rollout":
        caption = f"{answer['target']}  p={answer['probability']:.3f}  attention rollout over {answer['layers']} layers"
    else:
        caption = (
            f"{answer['target']}  p={answer['probability']:.3f}  IG {answer['n_steps']} steps from "
            f"{answer['baseline']}  delta {answer['convergence_delta']:+.4f}"
        )
    sheet = Image.new("RGB", (size[0], size[1] + 18), (255, 255, 255))
    sheet.paste(drawn.convert("RGB"), (0, 18))
    ImageDraw.Draw(sheet).text((4, 3), caption, fill=(0, 0, 0))
    return sheet


def render(image: Image.Image, answer) -> Image.Image:
    """The picture for one REST answer; ValueError for an answer of another kind."""
    if isinstance(answer, dict) and "heatmap" in answer:
        return draw_explanation(image, answer)
    if isinstance(answer, list):
        return draw_detections(*enlarge_small(image, answer))  # boxes are in the sent image's pixels
    if isinstance(answer, dict) and "mask" in answer:
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]))))
        classes = answer.get("classes") or [str(i) for i in range(int(mask.max()) + 1)]
        return draw_mask(image, mask, list(classes))
    raise ValueError(f"the answer is neither detections, a mask nor an explanation: {str(answer)[:200]}")


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="scripts/visualize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("image", help="image file to send")
    p.add_argument("--model", required=True, help="served model name (required)")
    p.add_argument("--out", default=None, help="PNG to write (default: <image stem>_<model>.png next to the image)")
    p.add_argument(
        "--run-dir",
        default=str(default_run_dir()),
        help=f"{RUN_DIR_HELP}: its address and token",
    )
    p.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="detectors: lowest score drawn (default: the model's configured one)",
    )
    p.add_argument(
        "--max-detections",
        type=int,
        default=None,
        help="detectors: most boxes drawn (default: the model's configured one)",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="ask /explanations and draw the Integrated Gradients heatmap (classifiers, segmenters) (default: off)",
    )
    p.add_argument("--target", default=None, help="with --explain: the class to explain (default: the top class)")
    p.add_argument(
        "--steps", type=int, default=None, help="with --explain: IG steps (default: the archive's explain_steps)"
    )
    p.add_argument(
        "--method",
        default=None,
        choices=EXPLAIN_METHODS,
        help="with --explain: integrated_gradients, or attention_rollout for a Vision Transformer "
        "(default: the archive's explain_method)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    path = Path(args.image)
    if not args.explain and (args.target is not None or args.steps is not None or args.method is not None):
        print("error: --target, --steps and --method go with --explain", file=sys.stderr)
        return 2
    suffix = "_explain" if args.explain else ""
    out = Path(args.out) if args.out else path.with_name(f"{path.stem}_{args.model}{suffix}.png")
    try:
        data = path.read_bytes()
        image = load_image(data, 3)
        ts = TorchServe(run_dir=Path(args.run_dir))
        fields = {
            k: str(v)
            for k, v in (
                ("score_threshold", args.score_threshold),
                ("max_detections", args.max_detections),
                ("target", args.target),
                ("n_steps", args.steps),
                ("method", args.method),
            )
            if v is not None
        }
        route = "explanations" if args.explain else "predictions"
        r = requests.post(
            f"{ts.url('inference')}/{route}/{args.model}",
            headers=ts.headers("inference"),
            files={"data": (path.name, data)},
            data=fields,
            timeout=120,
        )
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
