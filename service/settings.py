"""Service configuration from `CAMSERVE_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# `faithfulness_steps` (deletion/insertion steps of /explain?faithfulness=true) accepts these, bounds included
MIN_FAITHFULNESS_STEPS, MAX_FAITHFULNESS_STEPS = 2, 64


class Settings(BaseSettings):
    """Every field can be set as CAMSERVE_<FIELD NAME IN CAPITALS>."""

    model_config = SettingsConfigDict(env_prefix="CAMSERVE_", extra="ignore")

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available, else CPU")
    allow_tf32: bool = Field(
        False, description="CUDA: TF32 convolutions and matmuls (faster on Ampere+, ~1e-3 relative error in maps)"
    )
    models_file: Path | None = Field(None, description="TOML file listing the models; unset = embedded default")
    max_batch_size: int = Field(16, ge=1, le=1024, description="most images one engine batch holds")
    max_wait_ms: float = Field(0.0, ge=0, le=10_000, description="hold a non-full batch this long for more items")
    max_queue: int = Field(256, ge=1, description="items waiting per model beyond which requests get 503")
    request_timeout_s: float = Field(60.0, gt=0, description="per-request limit; past it 504")
    drain_s: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="after SIGTERM: readiness 503 at once, keep accepting this long, then finish and exit",
    )
    api_key: SecretStr | None = Field(None, description="when set, required as Bearer token or X-API-Key")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest accepted image file")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest accepted width x height")
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
    max_masked_forwards: int = Field(
        16384,
        ge=0,
        description="most extra forwards one request's Score-CAM or Ablation-CAM may run (images x layer channels)",
    )
    masked_batch_size: int = Field(
        32, ge=1, le=4096, description="masked (Score-CAM) or ablated (Ablation-CAM) inputs per extra forward"
    )
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins; none by default")
    warmup: bool = Field(True, description="run a forward and an explain pass per model at start-up")
    png_compress_level: int = Field(1, ge=0, le=9, description="zlib level for heatmap/overlay PNGs")
    log_level: str = Field("info", description="uvicorn/camserve log level")
    keep_freed_memory: bool = Field(
        True, description="glibc: keep freed tensor memory for reuse instead of page-faulting it in every batch"
    )
    compile: Literal["auto", "off"] = Field(
        "auto",
        description="auto: predictions and the default layer's maps run compiled (torch.compile) where that works "
        "and is faster, compiled during warm-up; off: eager. A model's `compile` in the models file overrides it",
    )
    compile_cache_dir: Path | None = Field(
        None, description="inductor's on-disk cache of compiled graphs, reused by restarts; unset = inductor's default"
    )
    torch_threads: int = Field(0, ge=0, description="intra-op threads of the torch thread; 0 = torch's default")

    @field_validator("models_file", "api_key", "compile_cache_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """An empty variable (as compose files pass through) means unset."""
        return None if isinstance(value, str) and not value.strip() else value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (a FastAPI dependency)."""
    return Settings()
