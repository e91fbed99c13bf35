"""(image, class) pairs of a batch: validated and grouped by target round on the host, uploaded once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from camserve.cam.errors import InvalidTargetError
from camserve.cam.heads import Head, probabilities

#: Per image: None (top-1 prediction), one class index, or a list of class indices (may be empty).
TargetSpec = Sequence[int | Sequence[int] | None] | None


@dataclass(frozen=True)
class Round:
    """One backward's rows: pair positions and their image and class indices, on the device."""

    rows: Tensor
    images: Tensor
    classes: Tensor


@dataclass(frozen=True)
class PairPlan:
    """Rows in (image, target) order; host lists and device views of one uploaded index tensor.

    Round r holds every image's r-th target, so one backward per round gives each image's gradient.
    """

    images: list[int]
    classes: list[int]
    image_index: Tensor
    class_index: Tensor
    rounds: list[Round]

    def __len__(self) -> int:
        return len(self.images)


def target_lists(targets: TargetSpec, batch: int) -> list[list[int] | None]:
    """Per image the wanted class indices (None: top-1), validated as integers."""
    if targets is None:
        return [None] * batch
    if isinstance(targets, (int, str)) or not isinstance(targets, Sequence):
        raise InvalidTargetError("targets must be a sequence with one entry per image")
    if len(targets) != batch:
        raise InvalidTargetError(f"got {len(targets)} target entries for a batch of {batch} images")
    return [_as_list(t, i) for i, t in enumerate(targets)]


def _as_list(target: int | Sequence[int] | None, image: int) -> list[int] | None:
    if target is None:
        return None
    items = [target] if isinstance(target, (int, Tensor)) else list(target)
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, Tensor)):
            raise InvalidTargetError(f"target {item!r} for image {image} is not a class index")
        out.append(int(item))
    return out


def choose_pairs(
    targets: TargetSpec, logits: Tensor, head: Head = "softmax", above: float | None = None, most: int = 20
) -> PairPlan:
    """`plan_pairs`; with `above`, an image without targets gets the classes whose probability under `head` is at
    least `above`, most probable first (at least its top-1, at most `most`)."""
    if above is not None:
        wanted = target_lists(targets, logits.shape[0])
        if any(w is None for w in wanted):
            values = probabilities(logits, head).cpu()
            for i, chosen in enumerate(wanted):
                if chosen is None:
                    order = values[i].argsort(descending=True, stable=True)[:most].tolist()
                    wanted[i] = [c for c in order if values[i, c] >= above] or order[:1]
            targets = wanted
    return plan_pairs(targets, logits)


def plan_pairs(targets: TargetSpec, logits: Tensor) -> PairPlan:
    """Flatten per-image targets into rows, check them against the logits, group them by round.

    The only device-to-host copy is the top-1 argmax, and only when some image asks for its top-1;
    the indices go to the device in one copy (from pinned memory on CUDA, without a sync).
    """
    batch, num_classes = logits.shape
    wanted = target_lists(targets, batch)
    top1 = logits.argmax(dim=1).tolist() if any(w is None for w in wanted) else []
    images: list[int] = []
    classes: list[int] = []
    by_round: list[list[int]] = []
    for i, chosen in enumerate(wanted):
        for r, c in enumerate([top1[i]] if chosen is None else chosen):
            if not 0 <= c < num_classes:
                raise InvalidTargetError(
                    f"class index {c} for image {i} is out of range: the model has {num_classes} classes"
                )
            if r == len(by_round):
                by_round.append([])
            by_round[r].append(len(images))
            images.append(i)
            classes.append(c)
    packed = images + classes
    for rows in by_round:
        packed += rows + [images[p] for p in rows] + [classes[p] for p in rows]
    device_index = _upload(packed, logits.device)
    count = len(images)
    views = list(device_index.split([count, count] + [len(rows) for rows in by_round for _ in range(3)]))
    rounds = [Round(*views[2 + 3 * r : 5 + 3 * r]) for r in range(len(by_round))]
    return PairPlan(images, classes, views[0], views[1], rounds)


def _upload(values: list[int], device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
