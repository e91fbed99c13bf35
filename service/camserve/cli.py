"""`camserve` command line: `serve`, and `predict` / `explain` clients against a running server."""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
from pathlib import Path

DEFAULT_URL = os.environ.get("CAMSERVE_URL", "http://127.0.0.1:8000")
TRACE = 5  # uvicorn's level below DEBUG


def _port(text: str) -> int:
    """A TCP port number, 1-65535 (argparse type; also checks CAMSERVE_PORT, the default)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (--port or CAMSERVE_PORT): not a number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port} (--port or CAMSERVE_PORT): use 1-65535")
    return port


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seconds {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid seconds {text!r}: use a positive number")
    return value


def _settings():
    """The CAMSERVE_* settings with logging set up, or None after printing why they are invalid (exit 2)."""
    from camserve.openmp import limit_openmp_spinning

    limit_openmp_spinning()  # before anything imports torch
    from camserve.models import ModelConfigError, read_models_file
    from camserve.settings import SettingsInvalid, load_settings, unknown_variables

    try:
        settings = load_settings()
    except SettingsInvalid as exc:
        print(f"camserve: invalid settings: {exc}", file=sys.stderr)
        return None
    level = TRACE if settings.log_level == "trace" else settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for warning in unknown_variables():
        logging.getLogger("camserve").warning(warning)
    if settings.models_file is not None:
        try:
            read_models_file(settings.models_file)  # fail fast on a broken file, before loading or listening
        except ModelConfigError as exc:
            print(f"camserve: {exc}", file=sys.stderr)
            return None
    return settings


def _prepare(args: argparse.Namespace) -> int:
    """Load every model of the models file as `serve` would, filling the cache: exported ONNX graphs, the runtime
    decision per bucket and (unless --no-compiled) inductor's kernels where it wins."""
    settings = _settings()
    if settings is None:
        return 2
    import torch

    from camserve.models import ModelConfigError, ModelRegistry

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if args.export_only:
        return _export_only(settings, args.model)
    if args.model:
        print("camserve: --model goes with --export-only", file=sys.stderr)
        return 2
    try:
        registry = ModelRegistry.from_settings(settings, measure_compiled=not args.no_compiled)
    except ModelConfigError as exc:
        print(f"camserve: {exc}", file=sys.stderr)
        return 1
    for model in registry:
        print(f"{model.name}: {model.runtime.summary}")
    return 0


def _export_only(settings, names: list[str]) -> int:
    """Export the split and ONNX prefix of the named models (all when none) into the cache, without timing: the
    background build's child (`camserve.models.background`)."""
    from camserve.models import default_models, load_model, read_models_file, resolve_device
    from camserve.models.runtimes import default_cache_dir, export_artifacts

    config = read_models_file(settings.models_file) if settings.models_file else default_models()
    unknown = sorted(set(names) - {spec.name for spec in config.models})
    if unknown:
        print(f"camserve: unknown model(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    device = resolve_device(settings.device)
    for spec in config.models:
        if names and spec.name not in names:
            continue
        try:
            model = load_model(spec, device, warmup=False)
            export_artifacts(
                spec.name, model.engine, model.example, cache_dir=settings.cache_dir or default_cache_dir()
            )
        except Exception as exc:  # every failure: this model is not exported, say why
            print(f"camserve: model {spec.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    settings = _settings()
    if settings is None:
        return 2
    import uvicorn

    from camserve.allocator import keep_freed_memory
    from camserve.api import create_app
    from camserve.server import DrainingServer

    if settings.keep_freed_memory:
        keep_freed_memory()
    failures: list[BaseException] = []

    def stop_on_load_error(exc: BaseException) -> None:
        failures.append(exc)
        server.should_exit = True

    app = create_app(settings, on_load_error=stop_on_load_error)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    server = DrainingServer(config, app.state.lifecycle, settings.drain_s)
    try:
        server.run()
    finally:
        if not app.state.load_finished.is_set():
            _exit_without_waiting_for_the_load(sys.exc_info()[1])
    if failures:
        print(f"camserve: {failures[0]}", file=sys.stderr)
        return 1
    return 0


def _exit_without_waiting_for_the_load(raised: BaseException | None) -> None:
    """Stopped (SIGTERM, or the port was taken) while models are still loading: exit now. Loading runs on the
    torch thread, which the interpreter would otherwise wait for (a compile can take minutes); nothing is
    served yet, so nothing is lost. The status is the stop's: 0 for a signal, uvicorn's for its failures, 1 (with
    the traceback) for anything unexpected, 130 for Ctrl-C."""
    log = logging.getLogger("camserve")
    if raised is None:
        code = 0
    elif isinstance(raised, SystemExit):
        code = raised.code if isinstance(raised.code, int) else 1
    elif isinstance(raised, KeyboardInterrupt):
        code = 130
    else:
        log.error("the server failed", exc_info=raised)
        code = 1
    log.warning("stopped while the models were still loading; exiting without them")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _client(args: argparse.Namespace):
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout)


def _post(args: argparse.Namespace, path: str, params: list[tuple[str, str]]) -> dict | None:
    import httpx

    files = []
    for name in args.images:
        path_ = Path(name)
        if not path_.exists():
            print(f"camserve: {name}: no such file", file=sys.stderr)
            return None
        try:
            files.append(("image", (path_.name, path_.read_bytes(), "application/octet-stream")))
        except OSError as exc:  # a directory, no permission, ...
            print(f"camserve: {name}: cannot be read ({exc.strerror or exc})", file=sys.stderr)
            return None
    try:
        with _client(args) as client:
            response = client.post(path, params=params, files=files)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        print(f"camserve: cannot reach {args.url}: {exc}", file=sys.stderr)
        return None
    if response.status_code != 200:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        print(f"camserve: server answered {response.status_code}: {detail}", file=sys.stderr)
        return None
    return response.json()


def _predict(args: argparse.Namespace) -> int:
    params = [("top_k", str(args.top_k)), *_common_params(args)]
    body = _post(args, "/predict", params)
    if body is None:
        return 1
    for name, result in zip(args.images, body["results"], strict=True):
        print(f"{name} ({result['width']}x{result['height']}, model {body['model']}, {_scores(body)})")
        for p in result["predictions"]:
            print(f"  {p['score']:7.4f}  {p['index']:5d}  {p['label']}")
    return 0


def _common_params(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The model and threshold flags, where given."""
    given = [("model", args.model), ("threshold", args.threshold)]
    return [(name, str(value)) for name, value in given if value is not None]


def _scores(body: dict) -> str:
    """What the scores are, from the head the response names."""
    if body.get("head") == "sigmoid":
        return "sigmoid scores: independent probabilities, need not sum to 1"
    return "softmax scores"


_SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


def _explain(args: argparse.Namespace) -> int:
    params = [("top_k", str(args.top_k)), ("overlay", "true"), *_common_params(args), *_option_params(args)]
    out = Path(args.out)
    try:  # before asking the server, so that its work is not lost to an unwritable folder
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"camserve: --out {args.out}: cannot be made a folder ({exc.strerror or exc})", file=sys.stderr)
        return 1
    body = _post(args, "/explain", params)
    if body is None:
        return 1
    stems = _unique_stems(args.images)
    print(f"model {body.get('model')}, {body['method']}, {_scores(body)}")
    try:
        for name, stem, result in zip(args.images, stems, body["results"], strict=True):
            for e in result["explanations"]:
                base = out / f"{stem}_{body['method']}_{e['index']}"
                Path(f"{base}_heatmap.png").write_bytes(base64.b64decode(e["heatmap"]))
                suffix = _SUFFIXES.get(e.get("overlay_media_type", "image/png"), ".png")
                Path(f"{base}_overlay{suffix}").write_bytes(base64.b64decode(e["overlay"]))
                print(f"{name}: {e['label']} ({e['score']:.4f}) -> {base}_heatmap.png, {base}_overlay{suffix}")
                if "faithfulness" in e:
                    print(f"  faithfulness: {_faithfulness_line(e['faithfulness'])}")
    except OSError as exc:
        print(f"camserve: cannot write into {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _cli_options() -> dict:
    """The explain options the CLI takes as flags, from their one declaration: all but `overlay` (always written).
    Imported on use: `camserve.options` imports torch (4.5 s cold), which the predict client does not need."""
    from camserve.options import ExplainOptions, PictureOptions

    fields = {**ExplainOptions.model_fields, **PictureOptions.model_fields}
    return {name: field for name, field in fields.items() if name != "overlay"}


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option, from its declaration (`camserve.options`); unset flags leave the server's default."""
    for name, field in _cli_options().items():
        flag = "--" + name.replace("_", "-")
        default = "" if field.default is None else f"; default {field.default}"
        if field.annotation is bool:
            parser.add_argument(flag, action="store_true", help=f"{field.description}")
        elif name in ("target", "layer"):
            parser.add_argument(flag, action="append", help=f"{field.description} (repeatable)")
        else:
            parser.add_argument(flag, help=f"{field.description}{default}")


def _option_params(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The query parameters of the option flags given."""
    params: list[tuple[str, str]] = []
    for name in _cli_options():
        value = getattr(args, name)
        if value is None or value is False:
            continue
        values = value if isinstance(value, list) else [value]
        params += [(name, "true" if v is True else str(v)) for v in values]
    return params


def _unique_stems(names: list[str]) -> list[str]:
    """Each image's file stem; a stem already taken (a/cat.jpg, b/cat.png) gets -2, -3, ... until it is free."""
    taken: set[str] = set()
    stems = []
    for name in names:
        stem = candidate = Path(name).stem
        number = 1
        while candidate in taken:
            number += 1
            candidate = f"{stem}-{number}"
        taken.add(candidate)
        stems.append(candidate)
    return stems


def _faithfulness_line(scores: dict) -> str:
    return (
        f"drop {scores['drop']:.4f}, increase {scores['increase']:.0f}, deletion AUC {scores['deletion_auc']:.4f}, "
        f"insertion AUC {scores['insertion_auc']:.4f} ({scores['steps']} steps)"
    )


def build_parser(explain_flags: bool = True) -> argparse.ArgumentParser:
    """The command line; `explain_flags`: add the explain command's option flags (they need torch imported)."""
    parser = argparse.ArgumentParser(prog="camserve", description="Image classification explained with CAMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service (configured by CAMSERVE_* variables)")
    serve.add_argument("--host", default=os.environ.get("CAMSERVE_HOST", "127.0.0.1"), help="env CAMSERVE_HOST")
    serve.add_argument("--port", type=_port, default=os.environ.get("CAMSERVE_PORT", "8000"), help="env CAMSERVE_PORT")
    serve.set_defaults(func=_serve)

    prepare = commands.add_parser(
        "prepare",
        help="build every cache for the models file ahead of time (ONNX graphs, runtime decisions, compiled kernels), "
        "so that `serve` starts in seconds; configured by CAMSERVE_* variables as `serve` is",
    )
    prepare.add_argument(
        "--no-compiled", action="store_true", help="do not compile and time inductor (minutes per model)"
    )
    prepare.add_argument(
        "--export-only",
        action="store_true",
        help="only export the ONNX graphs into the cache, timing nothing (what `serve` runs in the background)",
    )
    prepare.add_argument("--model", action="append", default=[], help="only this model (repeatable)")
    prepare.set_defaults(func=_prepare)

    def client(name: str, help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_)
        sub.add_argument("images", nargs="+", metavar="IMAGE")
        sub.add_argument("--url", default=DEFAULT_URL, help="server URL (env CAMSERVE_URL)")
        sub.add_argument("--api-key", default=os.environ.get("CAMSERVE_API_KEY"), help="env CAMSERVE_API_KEY")
        sub.add_argument("--model", default=None)
        sub.add_argument("--top-k", type=int, default=5)
        sub.add_argument(
            "--threshold",
            type=float,
            default=None,
            help="also every class at or above this probability (the server "
            "checks it; on sigmoid models, explain explains those classes)",
        )
        sub.add_argument("--timeout", type=_seconds, default=120.0, help="seconds to wait for the server")
        return sub

    predict = client("predict", "classify images with a running server and print a table")
    predict.set_defaults(func=_predict)
    explain = client("explain", "explain images with a running server; writes the pictures into --out (camserve-out)")
    explain.description = (
        "Explain images with a running server and write, into the folder --out (default camserve-out, made if "
        "missing), per image and explained class <image>_<method>_<class>_heatmap.png and "
        "<image>_<method>_<class>_overlay.png (.jpg or .webp with --overlay-format)."
    )
    if explain_flags:
        _add_option_flags(explain)
    explain.add_argument(
        "--out",
        default="camserve-out",
        help="output folder, made if missing (default: %(default)s): per image and explained class "
        "<image>_<method>_<class>_heatmap.png and <image>_<method>_<class>_overlay.<png|jpg|webp>",
    )
    explain.set_defaults(func=_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(explain_flags=argv[:1] == ["explain"]).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
