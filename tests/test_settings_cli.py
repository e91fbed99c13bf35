"""Settings from the environment and the command line's client commands."""

from __future__ import annotations

import pytest

from camserve.cli import build_parser, main
from camserve.settings import Settings


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("CAMSERVE_DEVICE", "cpu")
    monkeypatch.setenv("CAMSERVE_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("CAMSERVE_MODELS_FILE", "")
    monkeypatch.setenv("CAMSERVE_API_KEY", "k")
    monkeypatch.setenv("CAMSERVE_CORS_ORIGINS", '["https://a.example"]')
    settings = Settings()
    assert settings.device == "cpu" and settings.max_batch_size == 4
    assert settings.models_file is None and settings.api_key.get_secret_value() == "k"
    assert settings.cors_origins == ["https://a.example"]


def test_invalid_settings_are_refused(monkeypatch):
    monkeypatch.setenv("CAMSERVE_DEVICE", "tpu")
    with pytest.raises(ValueError, match="device"):
        Settings()


def test_serve_port_from_environment(monkeypatch):
    monkeypatch.setenv("CAMSERVE_PORT", "9123")
    args = build_parser().parse_args(["serve"])
    assert args.port == 9123


def test_client_reports_unreachable_server_and_missing_file(tmp_path, capsys, cat_jpeg):

    image = tmp_path / "cat.jpg"
    image.write_bytes(cat_jpeg)
    assert main(["predict", str(image), "--url", "http://127.0.0.1:9", "--timeout", "2"]) == 1
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "absent.jpg"), "--url", "http://127.0.0.1:9"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_server_runs_on_the_compiled_http_parser_and_event_loop():
    """`uvicorn[standard]` is a dependency: uvicorn's auto choice must land on httptools and uvloop."""
    import uvicorn
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    config = uvicorn.Config(lambda scope, receive, send: None, http="auto", loop="auto")
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    loop = config.get_loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_explain_passes_overlay_format_and_size_and_names_the_file_by_format(tmp_path, monkeypatch, capsys):
    import base64

    import camserve.cli as cli

    sent: list = []

    def fake_post(args, path, params):
        sent.append((path, params))
        picture = base64.b64encode(b"bytes").decode()
        explanation = {"index": 285, "label": "Egyptian cat", "score": 0.9, "heatmap": picture, "overlay": picture}
        explanation["overlay_media_type"] = "image/jpeg"
        return {"method": "gradcam", "results": [{"explanations": [explanation]}]}

    monkeypatch.setattr(cli, "_post", fake_post)
    out = tmp_path / "out"
    argv = ["explain", "cat.jpg", "--method", "gradcam", "--overlay-format", "jpeg", "--size", "256", "--out", str(out)]
    assert main(argv) == 0
    ((path, params),) = sent
    assert path == "/explain" and ("overlay_format", "jpeg") in params and ("size", "256") in params
    assert sorted(p.name for p in out.iterdir()) == ["cat_gradcam_285_heatmap.png", "cat_gradcam_285_overlay.jpg"]
    defaults = build_parser().parse_args(["explain", "cat.jpg"])
    assert (defaults.overlay_format, defaults.size) == (None, None)  # unset: the server applies the declared defaults


def test_explain_faithfulness_flags_are_sent_and_the_scores_printed(tmp_path, monkeypatch, capsys):
    import base64

    import camserve.cli as cli

    sent: list = []
    scores = {"drop": 0.25, "increase": 0.0, "deletion_auc": 0.125, "insertion_auc": 0.75, "steps": 8}

    def fake_post(args, path, params):
        sent.append(params)
        picture = base64.b64encode(b"bytes").decode()
        explanation = {"index": 285, "label": "Egyptian cat", "score": 0.9, "heatmap": picture, "overlay": picture}
        if ("faithfulness", "true") in params:
            explanation["faithfulness"] = scores
        return {"method": "gradcam", "results": [{"explanations": [explanation]}]}

    monkeypatch.setattr(cli, "_post", fake_post)
    out = str(tmp_path / "out")
    assert main(["explain", "cat.jpg", "--faithfulness", "--faithfulness-steps", "8", "--out", out]) == 0
    assert main(["explain", "cat.jpg", "--out", out]) == 0
    scored, plain = sent
    assert ("faithfulness", "true") in scored and ("faithfulness_steps", "8") in scored
    assert not any(name.startswith("faithfulness") for name, _ in plain)
    printed = capsys.readouterr().out
    assert printed.count("faithfulness:") == 1
    assert "drop 0.2500, increase 0, deletion AUC 0.1250, insertion AUC 0.7500 (8 steps)" in printed


def test_every_invalid_variable_is_named_in_one_message_and_serve_refuses_to_start(monkeypatch, capsys):
    from camserve.settings import SettingsInvalid, load_settings

    monkeypatch.setenv("CAMSERVE_MAX_BATCH_SIZE", "0")
    monkeypatch.setenv("CAMSERVE_REQUEST_TIMEOUT_S", "inf")
    monkeypatch.setenv("CAMSERVE_LOG_LEVEL", "warn")
    with pytest.raises(SettingsInvalid) as raised:
        load_settings()
    message = str(raised.value)
    assert "CAMSERVE_MAX_BATCH_SIZE='0': Input should be greater than or equal to 1" in message
    assert "CAMSERVE_REQUEST_TIMEOUT_S='inf': Input should be a finite number" in message
    assert "CAMSERVE_LOG_LEVEL='warn'" in message and "'warning'" in message
    assert "\n" not in message and "Traceback" not in message
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("camserve: invalid settings: CAMSERVE_MAX_BATCH_SIZE='0'") and err.count("\n") == 1


def test_settings_accept_what_operators_write(monkeypatch):
    from camserve.settings import SettingsInvalid, load_settings

    for text, origins in [
        ("*", ["*"]),
        ("https://a.example, https://b.example", ["https://a.example", "https://b.example"]),
    ]:
        monkeypatch.setenv("CAMSERVE_CORS_ORIGINS", text)
        assert load_settings().cors_origins == origins
    monkeypatch.setenv("CAMSERVE_CORS_ORIGINS", "[not json")
    with pytest.raises(SettingsInvalid, match="CAMSERVE_CORS_ORIGINS='\\[not json': not a JSON list"):
        load_settings()
    monkeypatch.delenv("CAMSERVE_CORS_ORIGINS")
    for level in ("WARNING", "trace", " Debug "):
        monkeypatch.setenv("CAMSERVE_LOG_LEVEL", level)
        assert load_settings().log_level == level.strip().lower()


def test_settings_that_cannot_work_together_are_refused(monkeypatch, tmp_path):
    from camserve.settings import SettingsInvalid, load_settings

    monkeypatch.setenv("CAMSERVE_MAX_QUEUE", "8")
    with pytest.raises(
        SettingsInvalid, match=r"CAMSERVE_MAX_QUEUE \(8\) is below CAMSERVE_MAX_IMAGES_PER_REQUEST \(32\)"
    ):
        load_settings()
    monkeypatch.setenv("CAMSERVE_MAX_IMAGES_PER_REQUEST", "8")
    assert load_settings().max_queue == 8
    a_file = tmp_path / "cache"
    a_file.write_text("")
    monkeypatch.setenv("CAMSERVE_CACHE_DIR", str(a_file))
    with pytest.raises(SettingsInvalid, match="CAMSERVE_CACHE_DIR=.*exists and is not a directory"):
        load_settings()


def test_unknown_camserve_variables_are_named_with_the_close_settings():
    from camserve.settings import unknown_variables

    environ = {
        "CAMSERVE_MAX_BATCHSIZE": "4",  # a typo
        "CAMSERVE_MAX_BATCH_SIZE": "4",
        "CAMSERVE_PORT": "8000",  # read by the command line
        "CAMSERVE_SERVICE_HOST": "10.0.0.1",  # Kubernetes service links of a Service named camserve
        "CAMSERVE_PORT_8000_TCP_ADDR": "10.0.0.1",
        "CAMSERVE_PREDICTOR_PORT": "tcp://10.0.0.2:80",  # ... and of KServe's camserve-predictor
        "CAMSERVE_PREDICTOR_SERVICE_PORT_HTTP": "80",
        "camserve_log_level": "debug",  # read case-insensitively: a setting
        "CAMSERVE_METRICS_PORT": "9090",  # not a link (no tcp:// value): a mistake
        "OTHER": "x",
    }
    typo, metrics = unknown_variables(environ)  # sorted by name
    assert typo.startswith("CAMSERVE_MAX_BATCHSIZE is not a camserve setting and is ignored")
    assert "did you mean CAMSERVE_MAX_BATCH_SIZE" in typo
    assert metrics.startswith("CAMSERVE_METRICS_PORT is not a camserve setting")


def test_bad_ports_and_timeouts_are_argument_errors(monkeypatch, capsys):
    monkeypatch.setenv("CAMSERVE_PORT", "abc")
    assert build_parser().parse_args(["predict", "cat.jpg"]).images == ["cat.jpg"]  # the clients still work
    for argv in (
        ["serve"],
        ["serve", "--port", "99999"],
        ["serve", "--port", "0"],
        ["predict", "a", "--timeout", "-1"],
    ):
        with pytest.raises(SystemExit) as raised:
            build_parser().parse_args(argv)
        assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "invalid port 'abc' (--port or CAMSERVE_PORT): not a number" in err
    assert "invalid port 99999" in err and "invalid port 0" in err and "invalid seconds '-1'" in err
    assert build_parser().parse_args(["serve", "--port", "65535"]).port == 65535


def test_client_reports_unreadable_inputs_and_a_bad_url(tmp_path, capsys, monkeypatch):
    import camserve.cli as cli

    assert main(["predict", str(tmp_path), "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot be read" in capsys.readouterr().err
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"x")
    assert main(["predict", str(image), "--url", "http://[::1"]) == 1
    assert "cannot reach http://[::1" in capsys.readouterr().err

    posted: list = []
    monkeypatch.setattr(cli, "_post", lambda *args: posted.append(args))
    a_file = tmp_path / "taken"
    a_file.write_text("")
    assert main(["explain", str(image), "--out", str(a_file)]) == 1
    assert "--out" in capsys.readouterr().err and posted == []  # refused before the server does the work


def test_explain_keeps_images_with_the_same_name_apart(tmp_path, monkeypatch, capsys):
    import base64

    import camserve.cli as cli

    def fake_post(args, path, params):
        explanation = {"index": 1, "label": "goldfish", "score": 0.5, "heatmap": "", "overlay": ""}
        results = [
            {"explanations": [{**explanation, "heatmap": base64.b64encode(n.encode()).decode()}]} for n in args.images
        ]
        return {"method": "gradcam", "results": results}

    monkeypatch.setattr(cli, "_post", fake_post)
    out = tmp_path / "out"
    images = ["a/img.jpg", "b/img.png", "img-2.jpg"]
    assert main(["explain", *images, "--out", str(out)]) == 0
    heatmaps = sorted(p.name for p in out.iterdir() if p.name.endswith("heatmap.png"))
    assert heatmaps == ["img-2-2_gradcam_1_heatmap.png", "img-2_gradcam_1_heatmap.png", "img_gradcam_1_heatmap.png"]
    assert (out / "img_gradcam_1_heatmap.png").read_bytes() == b"a/img.jpg"
    assert (out / "img-2_gradcam_1_heatmap.png").read_bytes() == b"b/img.png"


@pytest.mark.parametrize(
    ("raised", "code"),
    [(None, 0), (SystemExit(3), 3), (SystemExit("message"), 1), (KeyboardInterrupt(), 130), (RuntimeError("x"), 1)],
)
def test_the_exit_while_loading_keeps_the_stops_status(monkeypatch, caplog, raised, code):
    import camserve.cli as cli

    exits: list[int] = []

    def fake_exit(status: int) -> None:
        exits.append(status)

    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr(cli.logging, "shutdown", lambda: None)
    cli._exit_without_waiting_for_the_load(raised)
    assert exits == [code]
    unexpected = [r for r in caplog.records if r.getMessage() == "the server failed"]
    assert len(unexpected) == (1 if isinstance(raised, RuntimeError) else 0)
    assert not unexpected or unexpected[0].exc_info[1] is raised  # the traceback is logged


def test_replaced_compile_settings_are_refused_naming_what_replaces_them(monkeypatch, capsys):
    """CAMSERVE_COMPILE=off used to mean eager: start-up says to set CAMSERVE_RUNTIME instead of changing silently."""
    from camserve.cli import main

    monkeypatch.setenv("CAMSERVE_COMPILE", "off")
    monkeypatch.setenv("CAMSERVE_COMPILE_CACHE_DIR", "/tmp/x")
    assert main(["serve"]) == 2
    assert main(["prepare"]) == 2
    err = capsys.readouterr().err
    assert "CAMSERVE_COMPILE was replaced by CAMSERVE_RUNTIME (compile=off is runtime=eager" in err
    assert "CAMSERVE_COMPILE_CACHE_DIR was replaced by CAMSERVE_CACHE_DIR" in err


def test_prepare_fills_the_cache_so_the_next_load_decides_from_it(monkeypatch, tmp_path, capsys):
    """`camserve prepare` builds what `serve` would (the ONNX graph, the decision per bucket); a load after it reads
    both instead of exporting and timing again."""
    from camserve.cli import main
    from camserve.models import ModelRegistry

    monkeypatch.setenv("CAMSERVE_RUNTIME", "auto")
    monkeypatch.setenv("CAMSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CAMSERVE_MAX_BATCH_SIZE", "4")
    assert main(["prepare", "--no-compiled"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("efficientnet-lite0: batch 1: ") and "batch 2-4: " in printed
    assert len(list(tmp_path.glob("runtime/*/prefix.onnx"))) == 1
    assert len(list(tmp_path.glob("runtime/*/decision-*.json"))) == 1
    loaded = ModelRegistry.load(None, "cpu", runtime="auto", max_batch=4, cache_dir=tmp_path).get()
    assert loaded.runtime.from_cache and loaded.runtime.summary == printed.split(": ", 1)[1].strip()


def test_the_cli_names_the_head_and_sends_the_threshold(tmp_path, monkeypatch, capsys):
    import base64

    import camserve.cli as cli

    sent: list = []
    picture = base64.b64encode(b"bytes").decode()

    def fake_post(args, path, params):
        sent.append((path, params))
        prediction = {"index": 2, "label": "effusion", "score": 0.8}
        explanation = {**prediction, "heatmap": picture, "overlay": picture}
        result = {"width": 4, "height": 3, "predictions": [prediction], "explanations": [explanation]}
        return {"model": "xray", "head": "sigmoid", "method": "gradcampp", "results": [result]}

    monkeypatch.setattr(cli, "_post", fake_post)
    assert main(["predict", "chest.png", "--threshold", "0.4", "--model", "xray"]) == 0
    printed = capsys.readouterr().out
    assert "chest.png (4x3, model xray, sigmoid scores: independent probabilities, need not sum to 1)" in printed
    assert main(["explain", "chest.png", "--threshold", "0.4", "--out", str(tmp_path)]) == 0
    assert "model xray, gradcampp, sigmoid scores" in capsys.readouterr().out
    assert ("threshold", "0.4") in sent[0][1] and ("model", "xray") in sent[0][1]
    assert ("threshold", "0.4") in sent[1][1]
