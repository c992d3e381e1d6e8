"""Scoring detections the COCO way: pycocotools' ``COCOeval`` is the scorer, nothing re-implemented.

A detector's outputs become COCO results-format detections (https://cocodataset.org/#format-results):
``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``, plus ``"segmentation"`` (compressed
RLE of the mask thresholded at 0.5, as torchvision's and detectron2's COCO evaluators do) for
Mask R-CNN. They are written beside the task's JSON (``<out>.bbox.json``, ``<out>.segm.json``),
so anyone can re-score them with ``COCO.loadRes`` + ``COCOeval``; ``score`` is exactly that.
The summary numbers are ``COCOeval.stats[0:6]`` (AP at IoU .50:.95, AP50, AP75, AP small /
medium / large, up to 100 detections per image) in percent; pycocotools' -1 ("no ground truth
in this size range") is written as null.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
MASK_THRESHOLD = 0.5


def to_results(outputs: list[dict[str, Tensor]], image_ids: list[int], category_ids: list[int],
               masks: bool) -> dict[str, list[dict[str, Any]]]:
    """COCO results per iou type from torchvision outputs (``boxes`` x1y1x2y2, ``labels`` 1..K,
    ``scores``, ``masks`` (N, 1, H, W) probabilities) of the images ``image_ids``."""
    from pycocotools import mask as mask_utils

    results: dict[str, list[dict[str, Any]]] = {"bbox": [], **({"segm": []} if masks else {})}
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].float().cpu()
        xywh = boxes.clone()
        xywh[:, 2:] -= boxes[:, :2]
        cats = [category_ids[int(label) - 1] for label in output["labels"]]
        scores = output["scores"].float().cpu().tolist()
        for box, cat, score in zip(xywh.tolist(), cats, scores):
            results["bbox"].append({"image_id": image_id, "category_id": cat, "bbox": box, "score": score})
        if masks:
            binary = (output["masks"][:, 0] > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
            for mask, cat, score in zip(binary, cats, scores):
                rle = mask_utils.encode(np.asfortranarray(mask))
                segmentation = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
                results["segm"].append({"image_id": image_id, "category_id": cat, "segmentation": segmentation,
                                        "score": score})
    return results


def score(gt: Any, results: list[dict[str, Any]], iou_type: str) -> dict[str, float | None]:
    """``COCOeval(gt, gt.loadRes(results), iou_type)`` summarised: METRICS in percent (None: no
    ground truth in that size range). No detections at all scores 0."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {m: 0.0 for m in METRICS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)  # loadRes edits what it loads
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {m: (100.0 * float(v) if v >= 0 else None) for m, v in zip(METRICS, evaluator.stats[:6])}


def results_paths(out: str | Path) -> dict[str, Path]:
    """Where the detections of the task written to ``out`` go: ``<out stem>.<iou type>.json``."""
    out = Path(out)
    return {t: out.with_name(f"{out.stem}.{t}.json") for t in IOU_TYPES}


def write_results(results: dict[str, list[dict[str, Any]]], out: str | Path) -> dict[str, str]:
    """Write each iou type's detections beside ``out``; returns their paths."""
    written = {}
    for iou_type, path in results_paths(out).items():
        if iou_type in results:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results[iou_type]))
            written[iou_type] = str(path)
    return written
