"""Whether a loaded model serves through the compiled fast path (`CAMSERVE_COMPILE`, per-model `compile`).

`auto` compiles where it works and is faster: the model must export and split at its default layer, a C++
compiler must be present (inductor builds its kernels with one), the compiled logits must match the eager
ones, and the compiled predict must not be slower than eager at both batch 1 and 8 (timed in turns at
warm-up). Anything else serves eagerly, with one log
line that says why. `off` is the eager engine as before.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Literal

import torch

from service.cam import CamEngine

log = logging.getLogger(__name__)

CompileMode = Literal["auto", "off"]

#: Largest |compiled - eager| logit difference accepted, relative to the largest |logit| (at least 1).
TOLERANCE = {None: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def set_cache_dir(cache_dir: Path | None) -> None:
    """Point inductor's on-disk caches (compiled graphs and kernels) at `cache_dir`, so restarts reuse them."""
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use (`CXX`, else c++/g++/clang++ on PATH), or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((found for name in names if (found := shutil.which(name))), None)


def choose_execution(
    name: str, engine: CamEngine, example: torch.Tensor, *, mode: CompileMode, max_batch: int, warmup: bool
) -> str:
    """Compile the fast path when `mode` and the model allow it; returns "compiled" or "eager: <why>"."""
    why = _why_not(mode, warmup)
    if why is None:
        try:
            fast = engine.compile(example, max_batch=max_batch)
        except Exception as exc:  # any failure to export, split or compile means: serve eagerly
            why = f"cannot be compiled ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})"
        else:
            report = fast.report
            assert report is not None
            scale = max(1.0, engine.predict_eager(example).abs().max().item())
            tolerance = TOLERANCE.get(engine.autocast_dtype, 1e-3) * scale
            timings = ", ".join(
                f"batch {b}: eager {report.eager_ms[b]:.1f} ms, compiled {report.compiled_ms[b]:.1f} ms"
                for b in report.eager_ms
            )
            if report.max_logit_error > tolerance:
                why = f"compiled logits differ from eager by {report.max_logit_error:.3g} (> {tolerance:.3g})"
            elif report.slower:
                why = f"compiled is slower ({timings})"
            else:
                engine.use_fast_path(fast)
                log.info("model %s: compiled at layer %s in %.1fs (%s)", name, fast.layer, report.compile_s, timings)
                return "compiled"
    log.info("model %s: serving eagerly: %s", name, why)
    return f"eager: {why}"


def _why_not(mode: CompileMode, warmup: bool) -> str | None:
    if mode == "off":
        return "compile is off"
    if not warmup:
        return "warm-up is off, and no request may wait for a compiler"
    if cxx_compiler() is None:
        return "no C++ compiler on PATH (inductor needs one; set CXX or install g++)"
    return None
