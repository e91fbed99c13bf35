"""Runtimes built after readiness: a first start serves at once, eagerly, and each model switches to its faster
runtime when its graphs are exported.

Exporting is most of a first start (EfficientNet-Lite0: 5-9 s; ViT-B/16 and Swin-T: 20-25 s each on 2 cores) and
runs no kernels, so a child process does it (`camserve prepare --export-only --model NAME`, niced, one torch thread)
and writes the cache. Only then does the torch thread, between batches, read the cache, check the backend against
eager and time it (`ServedModel.finish_runtime`: about a second for Lite0, up to ~15 s for ViT-B, during which
batches wait). The export runs in a child rather than on a thread of its own because a second thread that runs
parallel torch operations slows every later one in the process (`batching.TorchThread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import camserve
from camserve.batching import TorchThread
from camserve.models.registry import ServedModel
from camserve.models.runtimes import default_cache_dir
from camserve.settings import Settings

log = logging.getLogger(__name__)

#: The child's command, before `--model NAME`.
EXPORT_COMMAND = [sys.executable, "-m", "camserve.cli", "prepare", "--export-only"]
#: Niceness added to the child, so that serving keeps the cores it needs.
CHILD_NICENESS = 10
#: Longest export allowed (ViT-B/16 takes 23 s on 2 cores); a child still running then is killed.
EXPORT_TIMEOUT_S = 1800.0


async def build_runtimes(models: Iterable[ServedModel], settings: Settings, thread: TorchThread) -> None:
    """Export, then switch over, every model whose runtime is `building`, one at a time. A failure leaves that model
    eager, with the child's last words (or the error) as the reason, and the next model is built; cancelling kills
    the child."""
    cache_dir = settings.cache_dir or default_cache_dir()
    for model in [m for m in models if m.runtime.building]:
        started = time.perf_counter()
        try:
            failure = await _export(model.name, settings, cache_dir)
            if failure is None:
                await thread.run(
                    lambda m=model: m.finish_runtime(max_batch=settings.max_batch_size, cache_dir=cache_dir)
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever went wrong, the model keeps answering as it does
            failure = f"{type(exc).__name__}: {exc}"
        if failure is None:
            model.runtime.build_s = time.perf_counter() - started
            log.info("model %s: now served on %s", model.name, model.runtime.summary)
        elif model.runtime.building:  # still eager (not when only the warm-up after switching failed)
            model.runtime.building = False
            model.runtime.not_used = {"onnxruntime": failure}
            log.warning("model %s: the background build failed, serving eagerly: %s", model.name, failure)
        else:
            log.warning("model %s: after switching to %s: %s", model.name, model.runtime.summary, failure)


async def _export(name: str, settings: Settings, cache_dir: Path) -> str | None:
    """Run the child for `name`; None when it succeeded, else why it did not."""
    package_root = str(Path(camserve.__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        "CAMSERVE_CACHE_DIR": str(cache_dir),
        "CAMSERVE_DEVICE": settings.device,
        "CAMSERVE_RUNTIME": settings.runtime,
        "CAMSERVE_TORCH_THREADS": "1",
        "CAMSERVE_LOG_LEVEL": "warning",
    }
    if settings.models_file is not None:
        env["CAMSERVE_MODELS_FILE"] = str(settings.models_file)
    try:
        child = await asyncio.create_subprocess_exec(
            *EXPORT_COMMAND,
            "--model",
            name,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return f"the export process did not start ({exc})"
    with contextlib.suppress(OSError):  # nicer than the server; not fatal where not permitted
        os.setpriority(os.PRIO_PROCESS, child.pid, os.getpriority(os.PRIO_PROCESS, 0) + CHILD_NICENESS)
    try:
        _, stderr = await asyncio.wait_for(child.communicate(), EXPORT_TIMEOUT_S)
    except TimeoutError:
        await _kill(child)
        return f"the export process did not finish within {EXPORT_TIMEOUT_S:.0f} s"
    except asyncio.CancelledError:
        await _kill(child)
        raise
    if child.returncode == 0:
        return None
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return f"the export process exited with {child.returncode}: {lines[-1][:300] if lines else 'no message'}"


async def _kill(child: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        child.kill()
    await child.wait()
