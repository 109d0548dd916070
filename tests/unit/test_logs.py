"""Logs of the commands that log: text or JSON lines with the fields a log call passes, one level check."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime

import pytest
from typer.testing import CliRunner

from balancing import errors
from balancing.cli import logs
from balancing.cli.main import app


def record(msg: str = "programmed %d", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("balancing.agent", logging.WARNING, __file__, 1, msg, args or (3,), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_lines_have_time_level_logger_message_and_the_extra_fields() -> None:
    line = logs.JsonFormatter().format(record(service="default/web", node="node-1", file=None, n=2))
    doc = json.loads(line)
    assert doc == {
        "time": doc["time"],
        "level": "warning",
        "logger": "balancing.agent",
        "message": "programmed 3",
        "service": "default/web",
        "node": "node-1",
        "file": None,
        "n": 2,
    }
    assert doc["time"].endswith("Z") and datetime.fromisoformat(doc["time"].replace("Z", "+00:00"))
    assert "\n" not in line


def test_json_lines_carry_tracebacks_and_unusual_values() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    rec.policy = {"kind": "LocalRedirectPolicy", "names": ("a", "b")}
    rec.obj = object()
    doc = json.loads(logs.JsonFormatter().format(rec))
    assert "ValueError: boom" in doc["exception"] and doc["policy"]["names"] == ["a", "b"]
    assert doc["obj"].startswith("<object")


def test_text_lines_add_the_fields_as_key_value() -> None:
    line = logs.TextFormatter().format(record(service="default/web"))
    assert line.endswith("WARNING balancing.agent: programmed 3 service=default/web")
    assert logs.TextFormatter().format(record()).endswith("programmed 3")


def test_setup_replaces_its_own_handler_only(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    before = [h for h in root.handlers]
    level = root.level
    try:
        logs.setup("info", "json")
        logs.setup("warning", "json")
        ours = [h for h in root.handlers if h not in before]
        assert len(ours) == 1 and root.level == logging.WARNING
        logging.getLogger("balancing.test").warning("hello", extra={"node": "n1"})
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert json.loads(line)["node"] == "n1"
    finally:
        for h in root.handlers[:]:
            if h not in before:
                root.removeHandler(h)
        root.setLevel(level)


@pytest.mark.parametrize("value", ["verbose", "", "trace"])
def test_bad_levels_name_the_flag(value: str) -> None:
    with pytest.raises(errors.ConfigError, match="--log-level"):
        logs.check_level("--log-level", value)
    assert logs.check_level("--log-level", "INFO") == "info"
    with pytest.raises(errors.ConfigError, match="--log-format"):
        logs.check_format("--log-format", "xml")


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--log-level", "verbose"], "--log-level"),
        (["--log-format", "xml"], "--log-format"),
        (["--listen", "nonsense"], "--listen"),
        (["--listen", "[::1"], "--listen"),
        (["--tls-cert", "/x"], "--tls-cert"),
    ],
)
def test_controller_flag_errors_are_one_line_and_exit_2(args: list[str], flag: str) -> None:
    result = CliRunner().invoke(app, ["controller", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}: "), result.output


def test_the_stream_is_stderr_at_the_time_of_the_record(monkeypatch: pytest.MonkeyPatch) -> None:
    handler = logs.setup("info")
    try:
        buf = io.StringIO()
        monkeypatch.setattr("sys.stderr", buf)
        logging.getLogger("balancing.test").info("to the new stderr")
        assert "to the new stderr" in buf.getvalue()
    finally:
        logging.getLogger().removeHandler(handler)
