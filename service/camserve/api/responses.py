"""The own API's result objects (`/predict`, `/explain`, and KServe v1, whose predictions are the same objects)
built from the service's typed results."""

from __future__ import annotations

import dataclasses

from camserve.results import ClassMap, ImageResult, InferenceResult


def predict_result(image: ImageResult) -> dict:
    return {
        "width": image.width,
        "height": image.height,
        "predictions": [{"index": p.index, "label": p.label, "score": p.score} for p in image.predictions],
    }


def explanation(entry: ClassMap, raw: bool) -> dict:
    body: dict = {"index": entry.index, "label": entry.label, "score": entry.score, "heatmap": entry.heatmap}
    if entry.overlay is not None:
        body["overlay"] = entry.overlay
        body["overlay_media_type"] = entry.overlay_media_type
    if raw:
        body["cam"] = entry.cam.tolist()
    if entry.faithfulness is not None:
        body["faithfulness"] = dataclasses.asdict(entry.faithfulness)
    return body


def explain_result(image: ImageResult, raw: bool) -> dict:
    body = {**predict_result(image), "explanations": [explanation(e, raw) for e in image.explanations]}
    if image.picture_size is not None:  # heatmaps and overlays resized by `size`
        body["picture_width"], body["picture_height"] = image.picture_size[1], image.picture_size[0]
    return body


def predict_response(result: InferenceResult) -> dict:
    return {"model": result.model, "head": result.head, "results": [predict_result(image) for image in result.images]}


def explain_response(result: InferenceResult, raw: bool) -> dict:
    return {
        "model": result.model,
        "head": result.head,
        "method": result.method,
        "layers": list(result.layers),
        "counterfactual": result.counterfactual,
        "results": [explain_result(image, raw) for image in result.images],
    }
