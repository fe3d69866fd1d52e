"""Object detectors in the registry, and the one function that turns their raw output into
answers: in-process checks, training's pictures and the served handler all use `detect_answers`.

- fasterrcnn_mobilenet_320: torchvision's CPU-light Faster R-CNN (MobileNetV3-Large FPN)
- fasterrcnn_resnet50_fpn:  torchvision's Faster R-CNN with a ResNet-50 FPN
- fcos_regnet_x_400mf:      FCOS on a RegNetX-400MF trunk whose c3/c4/c5 are taken with
  torchvision's create_feature_extractor, an FPN giving p3/p4/p5 (strides 8/16/32) and
  torchvision's FCOS head and loss (class/box/centerness heads, sigmoid focal loss,
  GIoU box loss, centerness targets, per-class NMS via batched_nms at inference).
- fcos_resnet:              the same FCOS on a small ResNet of basic blocks (model_defs.resnet),
  with a lighter head: trains from scratch on a CPU in a minute (tests/conftest.py's
  shapes_detector reaches mAP@0.5 about 0.5 that way).

Conventions (all four): `num_classes` counts the object classes WITHOUT the background;
the torchvision model gets num_classes + 1 and predicts labels 1..num_classes, where label
k is model.json's classes[k - 1]. Input is a list of float [0, 1] RGB tensors whose longer
side is `image_size` (model_defs.preprocessing.detection_input); the model's internal
transform then only normalizes and pads (its min_size = max_size = image_size, so it does
not resize again), and its boxes are in that resized frame. Nothing is downloaded: each is
built with random weights, and model_defs.pretrained fills its backbone, or all of it but the
class predictors, from a local weights file.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from torchvision.models import regnet_x_400mf
from torchvision.models.detection import FCOS, fasterrcnn_mobilenet_v3_large_320_fpn, fasterrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FeaturePyramidNetwork

from model_defs.preprocessing import boxes_to_original
from model_defs.registry import IMAGENET, register_model
from model_defs.resnet import ResNet

# DataConfig for detectors: input_size = the longer side after resizing (no crop); mean/std
# are the values the model normalizes with inside (torchvision's ImageNet defaults).
DETECTION_320 = IMAGENET.replace(input_size=320, resize_size=320)
DETECTION_512 = IMAGENET.replace(input_size=512, resize_size=512)
# The registry test builds every model: a small input keeps it quick.
_TEST = {"image_size": 128}
# Where a pretrained start puts its weights (model_defs.pretrained): the trunk's layers, and
# the layers sized by the number of classes, which stay as built for the dataset's classes.
TRUNK = ("backbone.body",)
FASTER_RCNN_PREDICTORS = ("roi_heads.box_predictor",)
FCOS_PREDICTORS = ("head.classification_head.cls_logits",)


def _size_kwargs(image_size: int) -> dict:
    return {"min_size": image_size, "max_size": image_size}


@register_model(
    task="detection", data_config=DETECTION_320, test_kwargs=_TEST, backbone=TRUNK, predictors=FASTER_RCNN_PREDICTORS
)
def fasterrcnn_mobilenet_320(
    num_classes: int = 3,
    image_size: int = 320,
    score_thresh: float = 0.01,
    detections_per_img: int = 100,
    representation_size: int = 256,
    rpn_post_nms_top_n_train: int = 300,
    box_batch_size_per_image: int = 128,
) -> nn.Module:
    """Faster R-CNN, MobileNetV3-Large FPN backbone, CPU-light (torchvision), random init."""
    # Lighter than torchvision's defaults where CPU training time goes: a 256-wide box head
    # (not 1024: the first FC alone is 12.8M multiply-adds per RoI), 300 RPN proposals and
    # 128 sampled RoIs per image in training (not 2000 and 512). Inference keeps 150 proposals.
    model = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes + 1,
        box_score_thresh=score_thresh,
        box_detections_per_img=detections_per_img,
        rpn_pre_nms_top_n_train=2 * rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        box_batch_size_per_image=box_batch_size_per_image,
        **_size_kwargs(image_size),
    )
    resolution = model.roi_heads.box_roi_pool.output_size[0]
    model.roi_heads.box_head = TwoMLPHead(model.backbone.out_channels * resolution**2, representation_size)
    model.roi_heads.box_predictor = FastRCNNPredictor(representation_size, num_classes + 1)
    return model


@register_model(
    task="detection", data_config=DETECTION_512, test_kwargs=_TEST, backbone=TRUNK, predictors=FASTER_RCNN_PREDICTORS
)
def fasterrcnn_resnet50(
    num_classes: int = 3, image_size: int = 512, score_thresh: float = 0.01, detections_per_img: int = 100
) -> nn.Module:
    """Faster R-CNN, ResNet-50 FPN backbone (torchvision), random init."""
    return fasterrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes + 1,
        box_score_thresh=score_thresh,
        box_detections_per_img=detections_per_img,
        **_size_kwargs(image_size),
    )


class TrunkFPN(nn.Module):
    """A classifier trunk's stride-8/16/32 outputs c3/c4/c5 (taken by create_feature_extractor
    at `nodes`) → FPN p3/p4/p5 of `out_channels` each."""

    def __init__(self, trunk: nn.Module, nodes: dict[str, str], out_channels: int = 128):
        super().__init__()
        self.body = create_feature_extractor(trunk, nodes)
        with torch.no_grad():
            channels = [f.shape[1] for f in self.body(torch.zeros(1, 3, 64, 64)).values()]
        self.fpn = FeaturePyramidNetwork(channels, out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        features = self.fpn(self.body(x))
        return OrderedDict((f"p{k[1]}", v) for k, v in features.items())


def _fcos(
    backbone: TrunkFPN,
    num_classes: int,
    image_size: int,
    head_convs: int,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
) -> FCOS:
    # One "anchor" per location, sized to the level's stride: FCOS uses them only for its
    # centre sampling and per-level size ranges (p3 up to 64 px, p4 64-128, p5 beyond).
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,)), aspect_ratios=((1.0,),) * 3)
    head = FCOSHead(backbone.out_channels, 1, num_classes + 1, num_convs=head_convs)
    # Label 0 (the background) is never a target: from random weights it could still score
    # above score_thresh; a bias of -20 (sigmoid 2e-9) keeps it out from the start.
    with torch.no_grad():
        head.classification_head.cls_logits.bias[0] = -20.0
    return FCOS(
        backbone,
        num_classes=num_classes + 1,
        anchor_generator=anchors,
        head=head,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        **_size_kwargs(image_size),
    )


@register_model(
    task="detection", data_config=DETECTION_512, test_kwargs=_TEST, backbone=TRUNK, predictors=FCOS_PREDICTORS
)
def fcos_regnet_x_400mf(
    num_classes: int = 3,
    image_size: int = 512,
    fpn_channels: int = 128,
    head_convs: int = 4,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.6,
    detections_per_img: int = 100,
) -> nn.Module:
    """FCOS on RegNetX-400MF c3-c5 + FPN p3-p5 (torchvision FCOS head and loss), random init."""
    nodes = {"trunk_output.block2": "c3", "trunk_output.block3": "c4", "trunk_output.block4": "c5"}
    backbone = TrunkFPN(regnet_x_400mf(weights=None), nodes, fpn_channels)
    return _fcos(backbone, num_classes, image_size, head_convs, score_thresh, nms_thresh, detections_per_img)


@register_model(
    task="detection", data_config=DETECTION_320, test_kwargs=_TEST, backbone=TRUNK, predictors=FCOS_PREDICTORS
)
def fcos_resnet(
    num_classes: int = 3,
    image_size: int = 320,
    widths: tuple[int, ...] = (32, 64, 128, 256),
    layers: tuple[int, ...] = (1, 1, 1, 1),
    fpn_channels: int = 64,
    head_convs: int = 2,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.6,
    detections_per_img: int = 100,
) -> nn.Module:
    """FCOS on a small ResNet of basic blocks (c3-c5) + FPN p3-p5, random init: for small data
    on a CPU, where it trains about 4x faster per image than the RegNetX-400MF one."""
    # RegNetX's grouped convolutions fall back to PyTorch's slow CPU convolution (half of
    # a training step's time, seen with torch.profiler); a ResNet has none.
    trunk = ResNet(tuple(layers), tuple(widths))
    backbone = TrunkFPN(trunk, {"stages.1": "c3", "stages.2": "c4", "stages.3": "c5"}, fpn_channels)
    return _fcos(backbone, num_classes, image_size, head_convs, score_thresh, nms_thresh, detections_per_img)


def detect_answers(
    output: dict,
    scale: tuple[float, float],
    size: tuple[int, int],
    classes: list[str],
    score_threshold: float,
    max_detections: int,
) -> list[dict]:
    """One image's torchvision output → [{"label", "score", "box": [x1, y1, x2, y2]}], best
    first, boxes in the original image's pixels (`size` = (width, height))."""
    scores = output["scores"].detach().float().cpu()
    keep = torch.nonzero(scores >= score_threshold).flatten()
    keep = keep[scores[keep].argsort(descending=True)][:max_detections]
    boxes = boxes_to_original(output["boxes"][keep], scale, size)
    labels = output["labels"][keep].tolist()
    return [
        {
            "label": classes[k - 1] if 0 < k <= len(classes) else str(k),
            "score": round(float(scores[i]), 6),
            "box": [round(v, 2) for v in box],
        }
        for i, k, box in zip(keep.tolist(), labels, boxes.tolist())
    ]
