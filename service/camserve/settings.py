"""Service configuration from `CAMSERVE_*` environment variables (pydantic-settings)."""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

PREFIX = "CAMSERVE_"
#: Settings that were replaced: start-up refuses them, saying what to set instead (nothing changes silently).
REPLACED = {
    "CAMSERVE_COMPILE": "CAMSERVE_RUNTIME (compile=off is runtime=eager; compile=auto is runtime=compiled, or "
    "runtime=auto for the fastest of every backend)",
    "CAMSERVE_COMPILE_CACHE_DIR": "CAMSERVE_CACHE_DIR",
}
#: CAMSERVE_* variables read outside Settings (the CLI's address and client options; the README's screenshot).
OTHER_VARIABLES = frozenset({"CAMSERVE_HOST", "CAMSERVE_PORT", "CAMSERVE_URL", "CAMSERVE_SCREENSHOT"})
#: Kubernetes' service links of Services named camserve or camserve-* (CAMSERVE_SERVICE_HOST,
#: CAMSERVE_PREDICTOR_SERVICE_PORT_HTTP, CAMSERVE_PORT_8000_TCP_ADDR, ...); a bare *_PORT is one only when its value
#: is the link's tcp://address:port.
SERVICE_LINK = re.compile(
    r"^CAMSERVE(_[A-Z0-9_]+)?_(SERVICE_(HOST|PORT(_[A-Z0-9_]+)?)|PORT_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)$"
)
LINK_ADDRESS = re.compile(r"^(tcp|udp|sctp)://")

#: What runs a model's forwards (service.models.runtimes): the setting and the models file's `runtime` key.
RuntimeMode = Literal["auto", "eager", "compiled", "onnxruntime"]

# `faithfulness_steps` (deletion/insertion steps of /explain?faithfulness=true) accepts these, bounds included
MIN_FAITHFULNESS_STEPS, MAX_FAITHFULNESS_STEPS = 2, 64


class Settings(BaseSettings):
    """Every field can be set as CAMSERVE_<FIELD NAME IN CAPITALS>."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore")

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available, else CPU")
    allow_tf32: bool = Field(
        False, description="CUDA: TF32 convolutions and matmuls (faster on Ampere+, ~1e-3 relative error in maps)"
    )
    models_file: Path | None = Field(None, description="TOML file listing the models; unset = embedded default")
    max_batch_size: int = Field(16, ge=1, le=1024, description="most images one engine batch holds")
    max_wait_ms: float = Field(0.0, ge=0, le=10_000, description="hold a non-full batch this long for more items")
    max_queue: int = Field(256, ge=1, description="items waiting per model beyond which requests get 503")
    request_timeout_s: float = Field(
        60.0, gt=0, le=86_400, allow_inf_nan=False, description="per-request limit; past it 504"
    )
    drain_s: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="after SIGTERM: readiness 503 at once, keep accepting this long, then finish and exit",
    )
    api_key: SecretStr | None = Field(None, description="when set, required as Bearer token or X-API-Key")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest accepted image file")
    max_image_pixels: int = Field(
        40_000_000, ge=1, le=1_000_000_000, description="largest accepted width x height (at most 1000 MP)"
    )
    max_images_per_request: int = Field(32, ge=1, description="most images in one request")
    max_body_bytes: int = Field(100 * 1024 * 1024, ge=1, description="largest accepted request body")
    max_render_pixels: int = Field(
        400_000_000, ge=1, description="most output pixels one /explain may render (images x targets, overlays x4)"
    )
    faithfulness_steps: int = Field(
        16,
        ge=MIN_FAITHFULNESS_STEPS,
        le=MAX_FAITHFULNESS_STEPS,
        description="deletion/insertion steps of a faithfulness score when the request does not say",
    )
    max_faithfulness_forwards: int = Field(
        2048,
        ge=1,
        description="most model forwards one request's faithfulness scores may take: images x targets x "
        "(1 + 2 x steps); beyond it 413",
    )
    max_heavy_forwards: int = Field(
        32768,
        ge=1,
        description="forward-equivalents of heavy work (perturbation methods, faithfulness) one model may hold "
        "queued or computing; beyond it new heavy requests get 503 while cheap ones are still served",
    )
    max_masked_forwards: int = Field(
        16384,
        ge=0,
        description="most extra forwards one request's perturbation method may run: images x layer channels "
        "(Score-CAM, Ablation-CAM), x layer cells (ReciproCAM) or x masks (RISE)",
    )
    masked_batch_size: int = Field(
        32,
        ge=1,
        le=4096,
        description="inputs per extra forward: masked (Score-CAM, RISE) or ablated (Ablation-CAM) inputs; the rows of "
        "Ablation-CAM and ReciproCAM through the network after the layer are as many as 64 MB of activations hold",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origins (a JSON list or comma-separated); none by default"
    )
    warmup: bool = Field(True, description="run a forward and an explain pass per model at start-up")
    png_compress_level: int = Field(1, ge=0, le=9, description="zlib level for heatmap/overlay PNGs")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="uvicorn/camserve log level"
    )
    keep_freed_memory: bool = Field(
        True, description="glibc: keep freed tensor memory for reuse instead of page-faulting it in every batch"
    )
    runtime: RuntimeMode = Field(
        "auto",
        description="what runs predictions and the default layer's prefix, per batch-size bucket: auto = the fastest "
        "of eager and ONNX Runtime timed at warm-up (and inductor where `camserve prepare` timed it); compiled or "
        "onnxruntime = that backend where faster than eager; eager = PyTorch only. A model's `runtime` in the models "
        "file overrides it",
    )
    runtime_build: Literal["background", "blocking"] = Field(
        "background",
        description="where a runtime's cache is missing (a first start): background = ready at once, serving eagerly, "
        "while a child process exports each model's graphs; the model then switches over after a few seconds of "
        "checks and timing between batches. blocking = export, check and time before readiness (minutes for large "
        "models). With the cache filled (`camserve prepare`, or a restart) both start on the cached choice",
    )
    cache_dir: Path | None = Field(
        None,
        description="exported ONNX graphs, runtime decisions and inductor's kernels, reused by restarts and filled "
        "by `camserve prepare`; unset = $XDG_CACHE_HOME/camserve or ~/.cache/camserve",
    )
    torch_threads: int = Field(0, ge=0, description="intra-op threads of the torch thread; 0 = torch's default")

    @field_validator("models_file", "api_key", "cache_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """An empty variable (as compose files pass through) means unset."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        """A JSON list, or origins separated by commas (`*` allows any)."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError as exc:
                raise ValueError(f"not a JSON list ({exc})") from None
        return [origin.strip() for origin in text.split(",") if origin.strip()]

    @field_validator("cache_dir")
    @classmethod
    def _a_directory(cls, value: Path | None) -> Path | None:
        if value is not None and value.exists() and not value.is_dir():
            raise ValueError(f"{value} exists and is not a directory")
        return value

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        largest = max(self.max_masked_forwards, self.max_faithfulness_forwards)
        if self.max_heavy_forwards < largest:
            raise ValueError(
                f"CAMSERVE_MAX_HEAVY_FORWARDS ({self.max_heavy_forwards}) is below the largest request it must hold "
                f"({largest}, CAMSERVE_MAX_MASKED_FORWARDS or CAMSERVE_MAX_FAITHFULNESS_FORWARDS)"
            )
        if self.max_queue < self.max_images_per_request:
            raise ValueError(
                f"CAMSERVE_MAX_QUEUE ({self.max_queue}) is below CAMSERVE_MAX_IMAGES_PER_REQUEST "
                f"({self.max_images_per_request}): a request that large could never be queued"
            )
        return self


class SettingsInvalid(ValueError):
    """The CAMSERVE_* variables do not make valid settings; the message names each variable and its problem."""


def load_settings() -> Settings:
    """Settings from the environment; SettingsInvalid (one line per problem, naming the variable) when invalid."""
    replaced = [f"{name} was replaced by {new}" for name, new in REPLACED.items() if name in os.environ]
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = list(replaced)
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if not error["loc"]:  # a check across settings names its variables itself
                problems.append(message)
                continue
            variable = f"{PREFIX}{str(error['loc'][0]).upper()}"
            value = os.environ.get(variable)
            problems.append(f"{variable}{'' if value is None else f'={value!r}'}: {message}")
        raise SettingsInvalid("; ".join(problems)) from None
    except SettingsError as exc:
        raise SettingsInvalid(str(exc)) from None
    if replaced:
        raise SettingsInvalid("; ".join(replaced))
    return settings


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """Warnings for CAMSERVE_* variables that no setting reads (typos), each with the close names.

    Kubernetes' service links (`SERVICE_LINK`) are not typos."""
    environ = os.environ if environ is None else environ
    known = {PREFIX + name.upper() for name in Settings.model_fields} | OTHER_VARIABLES | set(REPLACED)
    warnings = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings reads the names case-insensitively
        if not upper.startswith(PREFIX) or upper in known:
            continue
        if SERVICE_LINK.match(upper) or (upper.endswith("_PORT") and LINK_ADDRESS.match(environ[name])):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.75)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        warnings.append(f"{name} is not a camserve setting and is ignored{hint}")
    return warnings
