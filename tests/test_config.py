"""shiftlab.config: every SHIFTLAB_* switch read in one place, with one on/off rule."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import shiftlab
from shiftlab import config
from shiftlab.errors import UsageError

PACKAGE = Path(shiftlab.__file__).parent


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", "TRUE", " Yes ", "On"])
def test_on_values_are_true(value, monkeypatch):
    monkeypatch.setenv("SHIFTLAB_EXAMPLE", value)
    assert config.flag("SHIFTLAB_EXAMPLE") is True


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "", "  ", "FALSE", "Off"])
def test_off_values_are_false(value, monkeypatch):
    monkeypatch.setenv("SHIFTLAB_EXAMPLE", value)
    assert config.flag("SHIFTLAB_EXAMPLE") is False


def test_an_unset_switch_is_false(monkeypatch):
    monkeypatch.delenv("SHIFTLAB_EXAMPLE", raising=False)
    assert config.flag("SHIFTLAB_EXAMPLE") is False


@pytest.mark.parametrize("value", ["2", "y", "maybe", "enabled", "auto", "1.0"])
def test_any_other_value_is_a_usage_error_naming_the_variable_and_the_values(value, monkeypatch):
    monkeypatch.setenv("SHIFTLAB_EXAMPLE", value)
    with pytest.raises(UsageError) as info:
        config.flag("SHIFTLAB_EXAMPLE")
    message = str(info.value)
    assert message.startswith(f"SHIFTLAB_EXAMPLE={value.lower()!r}")
    for accepted in (*config.TRUE, *config.FALSE):
        assert accepted in message
    assert "\n" not in message


@pytest.mark.parametrize("switch, read", [("SHIFTLAB_OFFLINE", config.offline),
                                          ("SHIFTLAB_DEBUG", config.debug)])
def test_offline_and_debug_follow_the_rule(switch, read, monkeypatch):
    monkeypatch.setenv(switch, "yes")
    assert read() is True
    monkeypatch.setenv(switch, "0")  # SHIFTLAB_DEBUG=0 once meant "on" (any non-empty value)
    assert read() is False
    monkeypatch.setenv(switch, "sure")
    with pytest.raises(UsageError, match=switch):
        read()


def test_pretrained_offline_reads_the_switch_through_config(monkeypatch):
    from shiftlab.models.pretrained import offline

    monkeypatch.setenv("SHIFTLAB_OFFLINE", "on")
    assert offline() is True
    monkeypatch.setenv("SHIFTLAB_OFFLINE", "off")
    assert offline() is False
    monkeypatch.setenv("SHIFTLAB_OFFLINE", "offline")
    with pytest.raises(UsageError, match="SHIFTLAB_OFFLINE='offline'"):
        offline()


@pytest.mark.parametrize("value, mode", [
    ("", "auto"), ("auto", "auto"), (" AUTO ", "auto"), ("1", "on"), ("true", "on"),
    ("yes", "on"), ("on", "on"), ("0", "off"), ("false", "off"), ("no", "off"), ("off", "off")])
def test_native_has_three_states(value, mode, monkeypatch):
    monkeypatch.setenv("SHIFTLAB_NATIVE", value)
    assert config.native_mode() == mode


def test_native_unset_is_auto_and_anything_else_an_error(monkeypatch):
    monkeypatch.delenv("SHIFTLAB_NATIVE", raising=False)
    assert config.native_mode() == "auto"
    monkeypatch.setenv("SHIFTLAB_NATIVE", "sometimes")
    with pytest.raises(UsageError, match="SHIFTLAB_NATIVE='sometimes'"):
        config.native_mode()


def test_the_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("SHIFTLAB_CACHE_DIR", str(tmp_path / "mine"))
    assert config.cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("SHIFTLAB_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config.cache_dir() == tmp_path / "xdg" / "shiftlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert config.cache_dir() == Path.home() / ".cache" / "shiftlab"


def test_config_is_a_bottom_layer_module():
    """The standard library and shiftlab.errors only: any module can read settings through it."""
    tree = ast.parse((PACKAGE / "config.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"__future__", "os", "pathlib", ".errors"}


def test_no_other_module_reads_a_shiftlab_switch():
    """Every SHIFTLAB_* variable is read in shiftlab/config.py; elsewhere only its name may
    appear (messages, docs, the constant pretrained.OFFLINE_ENV)."""
    readers = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "config.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and "environ" in ast.unparse(node.func) \
                    or isinstance(node, ast.Subscript) and "environ" in ast.unparse(node.value):
                if "SHIFTLAB_" in ast.unparse(node):
                    readers.append(f"{path.relative_to(PACKAGE)}: {ast.unparse(node)}")
    assert readers == []


def test_a_malformed_debug_switch_does_not_hide_an_unexpected_error(monkeypatch, capsys):
    """SHIFTLAB_DEBUG is read while another error is being reported: a bad value is one warning
    line, and the error itself is still shown as one line (no traceback)."""
    from shiftlab.cli.console import user_errors

    monkeypatch.setenv("SHIFTLAB_DEBUG", "verbose")
    with pytest.raises(SystemExit) as info:
        with user_errors():
            raise RuntimeError("boom")
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "SHIFTLAB_DEBUG='verbose'" in err and "error: RuntimeError: boom" in err
    monkeypatch.setenv("SHIFTLAB_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        with user_errors():
            raise RuntimeError("boom")
