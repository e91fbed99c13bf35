"""Every request option, declared once: name, type, default, bounds, description and the check of its value.

The own API's query parameters and JSON body, KServe v1, the Open Inference Protocol v2's `parameters`, the CLI's
flags and the OpenAPI document are all built from these models, so a bad value gets the same message whichever
way it came in. Checks that need the served model (layers, class labels, budgets) are `camserve.plan`'s.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from camserve.cam.methods import METHOD_NAMES, get_method
from camserve.cam.render import COLORMAPS, MAX_PICTURE_SIDE, OVERLAY_FORMATS
from camserve.cam.rise import DEFAULT_MASKS as DEFAULT_RISE_MASKS
from camserve.errors import CamserveError
from camserve.numbers import whole_number
from camserve.settings import MAX_FAITHFULNESS_STEPS, MIN_FAITHFULNESS_STEPS

MAX_TARGETS = 20  # classes explained per image: each costs a backward round and a PNG per image
MAX_LAYERS = 8
DEFAULT_TOP_K = 5
MAX_RISE_MASKS = 100_000
DEFAULT_THRESHOLD = 0.5  # a sigmoid head's classes explained by default: those at or above it
PICTURE_SIZES: tuple[str, ...] = ("original", "model")  # or a maximum side in pixels, 1..MAX_PICTURE_SIDE
Picked = TypeVar("Picked", bound=BaseModel)


def _not_a_bool(value: object) -> object:
    if isinstance(value, bool):  # pydantic's lax mode would read true as 1
        raise PydanticCustomError("int_type", "a boolean is not a number")
    return value


#: An integer in a request: JSON true/false are refused rather than read as 1/0.
Integer = Annotated[int, BeforeValidator(_not_a_bool)]
#: A number in a request, likewise.
Number = Annotated[float, BeforeValidator(_not_a_bool)]


def _invalid(message: str) -> PydanticCustomError:
    """A value error worded by us (pydantic would prefix 'Value error, ')."""
    return PydanticCustomError("invalid_option", message)


def parse_picture_size(value: str | int) -> str | int:
    """`original`, `model` or a maximum side in pixels (1..MAX_PICTURE_SIDE), as str or int; else ValueError."""
    if isinstance(value, str) and value in PICTURE_SIZES:
        return value
    side: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        side = value
    elif isinstance(value, str):
        side = whole_number(value)
    if side is None or not 1 <= side <= MAX_PICTURE_SIDE:
        raise ValueError(
            f"invalid size {value!r}; use original, model or a maximum side in pixels from 1 to {MAX_PICTURE_SIDE}"
        )
    return side


class TopKOption(BaseModel):
    """How many top classes per image (the model comes from the path in KServe v1 and OIP v2)."""

    model_config = ConfigDict(extra="forbid")

    top_k: Integer = Field(DEFAULT_TOP_K, ge=1, description="number of top predictions per image", examples=[5])
    threshold: Number | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="also return every class whose probability is at least this (beyond top_k): the labels a "
        "multi-label (sigmoid) model assigns. On a sigmoid model, /explain without targets explains every class at "
        f"or above it (default {DEFAULT_THRESHOLD}; at least the top one, at most {MAX_TARGETS})",
        examples=[0.5],
    )


def _size_schema(schema: dict[str, Any]) -> None:
    """What `size` accepts, exactly: a side as a number or as digits (1..MAX_PICTURE_SIDE), or a size's name."""
    assert MAX_PICTURE_SIDE == 8192  # the digits pattern below spells 1..8192
    schema.pop("anyOf", None)
    schema["anyOf"] = [
        {"type": "integer", "minimum": 1, "maximum": MAX_PICTURE_SIDE},
        {"type": "string", "enum": list(PICTURE_SIZES)},
        {"type": "string", "pattern": r"^\s*0*([1-9][0-9]{0,2}|[1-7][0-9]{3}|80[0-9]{2}|81[0-8][0-9]|819[0-2])\s*$"},
    ]


class PriorityOption(BaseModel):
    """Where the request's work goes in its model's queue (OIP v2 and Triton call it `priority` too)."""

    model_config = ConfigDict(extra="forbid")

    priority: Integer = Field(
        0,
        ge=0,
        le=3,
        description="scheduling priority: 1 high, 2 normal, 3 low; 0 the default (normal). Cheap work (predictions, "
        "gradient methods) always runs before heavy work (perturbation methods, faithfulness); within each, "
        "higher priority runs first",
        examples=[1],
    )


class PredictOptions(TopKOption, PriorityOption):
    """What every request of the own API may say: which model, and how many top classes per image."""

    model: str | None = Field(
        None, description="served model name; default: the default model", examples=["efficientnet-lite0"]
    )


class ExplainOptions(BaseModel):
    """What to explain and how: the method, classes, layers and sign, and whether to score faithfulness."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(
        "gradcampp",
        description=f"CAM method: {', '.join(METHOD_NAMES)} (gradcam++ accepted)",
        examples=["gradcampp"],
    )
    target: list[Integer | str] | Integer | str | None = Field(
        None,
        description=f"classes to explain: indices or exact labels (at most {MAX_TARGETS}); default the top-1 "
        "prediction",
        examples=[["285", "tabby"]],
    )
    layer: list[str] | str | None = Field(
        None,
        description=f"target layers by dotted module path (at most {MAX_LAYERS}; several = fusion); default per model",
        examples=[["_blocks.10", "_swish"]],
    )
    counterfactual: bool = Field(False, description="explain what lowers the class score (-gradient)", examples=[False])
    faithfulness: bool = Field(
        False,
        description="also score each map: Average Drop / Increase in Confidence and deletion / insertion AUC "
        "(1 + 2 x faithfulness_steps extra forwards per map)",
        examples=[True],
    )
    faithfulness_steps: Integer | None = Field(
        None,
        ge=MIN_FAITHFULNESS_STEPS,
        le=MAX_FAITHFULNESS_STEPS,
        description="deletion/insertion steps of the faithfulness scores (needs faithfulness=true; default "
        "CAMSERVE_FAITHFULNESS_STEPS, 16)",
        examples=[16],
    )

    rise_masks: Integer | None = Field(
        None,
        ge=1,
        le=MAX_RISE_MASKS,
        description=f"random masks of RISE (read with method=rise only; default {DEFAULT_RISE_MASKS}): one forward "
        "each, within CAMSERVE_MAX_MASKED_FORWARDS",
        examples=[1000],
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        try:
            return get_method(value).name
        except CamserveError as exc:
            raise _invalid(str(exc)) from None

    @field_validator("target", "layer")
    @classmethod
    def _as_list(cls, value: Any, info: Any) -> list | None:
        if value is None:
            return None
        values = value if isinstance(value, list) else [value]
        limit = MAX_TARGETS if info.field_name == "target" else MAX_LAYERS
        if len(values) > limit:
            raise _invalid(f"{len(values)} {info.field_name}s requested; at most {limit} per request")
        return values

    @property
    def targets(self) -> list[int | str] | None:
        return self.target  # type: ignore[return-value]  # a list after validation

    @property
    def layers(self) -> list[str] | None:
        return self.layer  # type: ignore[return-value]


class PictureOptions(BaseModel):
    """How maps become pictures: the overlay, its colormap, opacity and format, and the pictures' size."""

    model_config = ConfigDict(extra="forbid")

    overlay: bool = Field(False, description="also return the colormap blended over the image", examples=[True])
    colormap: str = Field(
        "jet",
        description=f"overlay colormap: {', '.join(COLORMAPS)}",
        examples=["jet"],
        json_schema_extra={"enum": list(COLORMAPS)},
    )
    alpha: Number = Field(0.5, ge=0.0, le=1.0, description="overlay opacity of the heatmap", examples=[0.5])
    overlay_format: str = Field(
        "png",
        description=f"overlay file format: {', '.join(OVERLAY_FORMATS)} (heatmaps are always PNG)",
        examples=["jpeg"],
        json_schema_extra={"enum": list(OVERLAY_FORMATS)},
    )
    size: Integer | str = Field(
        "original",
        description="size of heatmaps and overlays: original (the image's), model (the model input's) or a maximum "
        f"side in pixels (1-{MAX_PICTURE_SIDE}, aspect ratio kept, never enlarged)",
        examples=["original", "model", "512"],
        json_schema_extra=_size_schema,
    )

    @field_validator("colormap")
    @classmethod
    def _known_colormap(cls, value: str) -> str:
        if value not in COLORMAPS:
            raise _invalid(f"unknown colormap {value!r}; use one of: {', '.join(COLORMAPS)}")
        return value

    @field_validator("overlay_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in OVERLAY_FORMATS:
            raise _invalid(f"unknown overlay_format {value!r}; use one of: {', '.join(OVERLAY_FORMATS)}")
        return value

    @field_validator("size")
    @classmethod
    def _parsed_size(cls, value: str | int) -> str | int:
        try:
            return parse_picture_size(value)
        except ValueError as exc:
            raise _invalid(str(exc)) from None


class RawOption(BaseModel):
    """The own API's and KServe v1's choice to return the raw maps (OIP v2 has its `cam` output instead)."""

    model_config = ConfigDict(extra="forbid")

    raw: bool = Field(False, description="also return the raw map at feature resolution", examples=[False])


class ExplainQuery(PredictOptions, ExplainOptions, PictureOptions, RawOption):
    """Every option of `/explain` (its query parameters, and its JSON body beside `images`)."""


def describe_problems(errors: list[Any]) -> str:
    """pydantic's errors as one message, the same whichever protocol carried the request: `where: what` for each,
    `where` the dotted path inside the query or body (`method`, `instances.0.image.b64`)."""
    problems = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        if loc and loc[0] in ("query", "body", "path", "header"):
            loc = loc[1:]
        problems.append(f"{'.'.join(loc) or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(problems)


def pick(model: type[Picked], *sources: BaseModel | None) -> Picked:
    """`model` from the fields set in `sources` (None: none); a field set in a later source wins."""
    values: dict[str, Any] = {}
    for source in filter(None, sources):
        values.update({name: getattr(source, name) for name in source.model_fields_set if name in model.model_fields})
    return model.model_validate(values)
