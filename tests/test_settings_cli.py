"""Settings from the environment and the command line's client commands."""

from __future__ import annotations

import pytest

from service.cli import build_parser, main
from service.settings import Settings


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


def test_client_reports_unreachable_server_and_missing_file(tmp_path, capsys, chelsea):
    from tests.conftest import jpeg_bytes

    image = tmp_path / "cat.jpg"
    image.write_bytes(jpeg_bytes(chelsea))
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

    import service.cli as cli

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
    assert (defaults.overlay_format, defaults.size) == ("png", "original")


def test_explain_faithfulness_flags_are_sent_and_the_scores_printed(tmp_path, monkeypatch, capsys):
    import base64

    import service.cli as cli

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
