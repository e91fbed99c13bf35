"""The runtime layer against the fastest plain forward and OpenVINO XAI, side by side in one run.

    .venv/bin/python -m bench.bench_runtime --openvino-xai-python .venv-ovxai/bin/python \\
        --json docs/bench_runtime_cpu.json

The embedded EfficientNet-Lite0 (real weights, real photos) at batch 1 and 8. Contenders, in turns within every
round: camserve's eager predict; the whole model exported to ONNX and run by ONNX Runtime directly (the fastest
plain forward on this CPU); camserve predict and Grad-CAM++ explain with `CAMSERVE_RUNTIME=auto`'s choice; and,
when `--openvino-xai-python` names a Python with `openvino-xai` installed (it pins an old OpenVINO, so it lives in
a venv of its own: `make bench-runtime` makes one), OpenVINO XAI 1.1's ReciproCAM (white-box, raw maps of all
classes: its cheapest call) and OpenVINO's plain forward on the same ONNX file, each as OpenVINO runs by default
(bfloat16 on a CPU that has it: its INFERENCE_PRECISION_HINT) and in float32 (ReciproCAM as its inserted branch,
compiled with the f32 hint), run by a child process that times its own calls when told to: only one contender runs
at a time.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from bench.bench_engine import photo_batch
from camserve.models import ModelSpec, load_model

#: The child: OpenVINO XAI's ReciproCAM on the ONNX file, one image per call (its inserted branch assumes batch 1).
CHILD = r"""
import sys, time
import numpy as np
import openvino as ov
import openvino_xai as xai
from openvino_xai.explainer import ExplainMode

onnx_path, images_path = sys.argv[1], sys.argv[2]
images = np.load(images_path)
core = ov.Core()
model = core.read_model(onnx_path)
# OpenVINO infers in bfloat16 by default where the CPU has it (INFERENCE_PRECISION_HINT): "default"
# is what users get, "f32" the precision camserve computes in.
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
explainer = xai.Explainer(model=model, task=xai.Task.CLASSIFICATION, explain_mode=ExplainMode.WHITEBOX,
                          explain_method=xai.Method.RECIPROCAM)
branch = xai.insert_xai(core.read_model(onnx_path), task=xai.Task.CLASSIFICATION,
                        explain_method=xai.Method.RECIPROCAM)
reciprocam_f32 = core.compile_model(branch, "CPU", F32).create_infer_request()
forward = {hint: core.compile_model(model, "CPU", config).create_infer_request()
           for hint, config in (("default", {}), ("f32", F32))}
def reciprocam(batch):
    for image in images[:batch]:
        explainer(image[None], targets=-1, resize=False, colormap=False)  # raw maps, as camserve's engine gives
def reciprocam_branch_f32(batch):
    for image in images[:batch]:
        reciprocam_f32.infer({0: image[None]})
contenders = {
    "reciprocam": reciprocam,
    "reciprocam-f32": reciprocam_branch_f32,
    "forward": lambda batch: forward["default"].infer({0: images[:batch]}),
    "forward-f32": lambda batch: forward["f32"].infer({0: images[:batch]}),
}
print("ready", flush=True)
for line in sys.stdin:
    name, batch = line.split()
    started = time.perf_counter()
    contenders[name](int(batch))
    print((time.perf_counter() - started) * 1000, flush=True)
"""


class OpenVinoChild:
    """OpenVINO (XAI) in its own interpreter; `run(name, batch)` returns the milliseconds the child measured."""

    def __init__(self, python: str, onnx_path: Path, images: np.ndarray, folder: Path) -> None:
        np.save(folder / "images.npy", images)
        (folder / "child.py").write_text(CHILD)
        command = [python, str(folder / "child.py"), str(onnx_path), str(folder / "images.npy")]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"
        script = 'from importlib.metadata import version; print(version("openvino"), version("openvino-xai"))'
        version = [python, "-c", script]
        self.versions = subprocess.run(version, capture_output=True, text=True, check=True).stdout.split()

    def run(self, name: str, batch: int) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{name} {batch}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def plain_onnx_session(module: torch.nn.Module, folder: Path) -> tuple[Path, Callable[[np.ndarray], object]]:
    """The whole model exported to ONNX (dynamic batch) and an ONNX Runtime session over it, as camserve sets one
    up (intra-op threads = torch's, no spinning)."""
    import onnxruntime as ort

    path = folder / "model.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = torch.zeros(2, 3, 224, 224)
    torch.onnx.export(module, (example,), str(path), input_names=["images"], dynamo=True, dynamic_shapes=({0: batch},))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return path, lambda x: session.run(None, {"images": x})


def transformers(rounds: int, folder: Path) -> list[dict[str, object]]:
    """ViT-B/16 and Swin-T (seeded random weights) eager against `auto`'s choice, predict and Grad-CAM++ explain at
    batch 1 and 8, in turns: `auto` must never be slower than eager."""
    import copy

    from bench.bench_transformers import IMAGENET_MEAN, IMAGENET_STD, build_model
    from camserve.cam import CamEngine
    from camserve.models.runtimes import choose_runtime

    rows = []
    for name in ("vit_b_16", "swin_t"):
        model = build_model(name)
        eager, auto = CamEngine(copy.deepcopy(model)), CamEngine(model)
        example = torch.zeros(1, 3, 224, 224)
        eager.trace(example)
        auto.trace(example)
        choice = choose_runtime(name, auto, example, mode="auto", max_batch=16, warmup=True, cache_dir=folder)
        print(f"{name}: {choice.summary} (built in {choice.build_s:.1f} s)", flush=True)
        for batch in (1, 8):
            x = photo_batch(batch, 224, torch.device("cpu"), IMAGENET_MEAN, IMAGENET_STD)
            contenders: dict[str, Callable[[], object]] = {
                "eager predict": functools.partial(eager.predict, x),
                "auto predict": functools.partial(auto.predict, x),
                "eager explain": functools.partial(eager.explain, x, method="gradcampp"),
                "auto explain": functools.partial(auto.explain, x, method="gradcampp"),
            }
            times: dict[str, list[float]] = {n: [] for n in contenders}
            for fn in contenders.values():
                fn()
            for _ in range(rounds):
                for n, fn in contenders.items():
                    begun = time.perf_counter()
                    fn()
                    times[n].append((time.perf_counter() - begun) * 1000)
            medians = {n: statistics.median(v) for n, v in times.items()}
            row = {"model": name, "batch": batch, "runtime": choice.summary, "median_ms": medians}
            row["predict_eager_over_auto"] = medians["eager predict"] / medians["auto predict"]
            row["explain_eager_over_auto"] = medians["eager explain"] / medians["auto explain"]
            print(f"{name} batch {batch}: " + ", ".join(f"{n} {m:.1f} ms" for n, m in medians.items()), flush=True)
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--openvino-xai-python", default=None, help="a Python with openvino-xai installed")
    parser.add_argument("--transformers", action="store_true", help="ViT-B/16 and Swin-T: auto against eager")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.transformers:
        table = transformers(args.rounds, Path(tempfile.mkdtemp(prefix="bench-runtime-")))
        if args.json:
            machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
            command = " ".join(["python -m bench.bench_runtime", *sys.argv[1:]])
            result = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine, "command": command}
            Path(args.json).write_text(json.dumps({**result, "table": table}, indent=1) + "\n")
        return 0
    torch.set_num_threads(torch.get_num_threads())
    folder = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    started = time.perf_counter()
    served = load_model(
        ModelSpec(name="efficientnet-lite0"), torch.device("cpu"), runtime="auto", max_batch=16, cache_dir=folder
    )
    print(f"auto: {served.runtime.summary} (built in {time.perf_counter() - started:.1f} s)", flush=True)
    eager = load_model(ModelSpec(name="efficientnet-lite0"), torch.device("cpu"), runtime="eager")
    onnx_path, onnx_forward = plain_onnx_session(eager.module, folder)
    x_all = photo_batch(max(args.batches), 224, torch.device("cpu"))
    child = None
    if args.openvino_xai_python:
        child = OpenVinoChild(args.openvino_xai_python, onnx_path, x_all.numpy(), folder)
    table = []
    for batch in args.batches:
        x = x_all[:batch].contiguous()
        x_np = x.numpy()
        ours: dict[str, Callable[[], object]] = {
            "camserve eager predict": lambda x=x: eager.engine.predict(x),
            "onnxruntime plain forward": lambda x_np=x_np: onnx_forward(x_np),
            "camserve auto predict": lambda x=x: served.engine.predict(x),
            "camserve auto Grad-CAM++ explain": lambda x=x: served.engine.explain(x, method="gradcampp"),
        }
        times: dict[str, list[float]] = {name: [] for name in ours}
        theirs = ("reciprocam", "reciprocam-f32", "forward", "forward-f32") if child else ()
        for name in theirs:
            times[f"openvino {name}"] = []
        for fn in ours.values():
            fn()
        for name in theirs:
            child.run(name, batch)  # type: ignore[union-attr]
        for _ in range(args.rounds):
            for name, fn in ours.items():
                begun = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - begun) * 1000)
            for name in theirs:
                times[f"openvino {name}"].append(child.run(name, batch))  # type: ignore[union-attr]
        medians = {name: statistics.median(values) for name, values in times.items()}
        explain = medians["camserve auto Grad-CAM++ explain"]
        fastest_f32 = min(medians["onnxruntime plain forward"], medians.get("openvino forward-f32", float("inf")))
        row: dict[str, object] = {"batch": batch, "median_ms": medians}
        row["explain_x_fastest_f32_forward"] = explain / fastest_f32
        row["auto_predict_x_eager"] = medians["camserve eager predict"] / medians["camserve auto predict"]
        if child:
            row["explain_x_openvino_default_forward"] = explain / medians["openvino forward"]
            row["reciprocam_x_explain"] = medians["openvino reciprocam"] / explain
            row["reciprocam_f32_x_explain"] = medians["openvino reciprocam-f32"] / explain
        table.append(row)
        print(f"batch {batch}: " + ", ".join(f"{n} {m:.1f} ms" for n, m in medians.items()), flush=True)
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if "_x_" in k))
    if child:
        child.close()
    if args.json:
        result = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
            "command": " ".join(["python -m bench.bench_runtime", *sys.argv[1:]]),
            "torch": torch.__version__,
            "openvino": child.versions if child else None,
            "auto": served.runtime.summary,
            "rounds": args.rounds,
            "table": table,
        }
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
