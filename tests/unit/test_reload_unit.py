"""The config file: parsed as a whole, layered under env and options, reloaded on demand."""

from __future__ import annotations

import pytest

from deltagw.config import ConfigError, load_settings
from deltagw.process.reload import ConfigReloader, read_config_file, settings_with_file


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "deltagw.toml"
    path.write_text(text)
    return str(path)


def test_file_values_become_settings(tmp_path):
    """Numbers, booleans and lists in TOML read like their environment strings."""
    path = _write(
        tmp_path,
        'STORAGE_TIMEOUT = 2.5\nRATE_LIMIT_REQUESTS = 7\nRATE_LIMIT_FAIL_CLOSED = true\n'
        'CORS_ORIGINS = ["https://a.example", "https://b.example"]\n',
    )
    settings = settings_with_file({}, {}, path)
    assert settings.storage_timeout == 2.5
    assert settings.rate_limit_requests == 7
    assert settings.rate_limit_fail_closed is True
    assert settings.cors_origins == ("https://a.example", "https://b.example")


def test_environment_and_options_beat_the_file(tmp_path):
    """Option beats variable beats file beats default."""
    path = _write(tmp_path, 'SERVICE_NAME = "from-file"\nSTORAGE_SERVICE_URL = "http://file:1"\nAUTH_TIMEOUT = 3\n')
    settings = settings_with_file(
        {"STORAGE_SERVICE_URL": "http://env:2"}, {"service-name": "from-option"}, path
    )
    assert settings.service_name == "from-option"
    assert settings.storage_url == "http://env:2"
    assert settings.auth_timeout == 3


@pytest.mark.parametrize(
    "text, named",
    [
        ("STORAGE_TIMEOUT = = 1", "invalid TOML"),
        ("NO_SUCH_SETTING = 1", "NO_SUCH_SETTING"),
        ("STORAGE_TIMEOUT = {a = 1}", "STORAGE_TIMEOUT"),
    ],
)
def test_bad_file_rejected_as_a_whole(tmp_path, text, named):
    """Invalid TOML, unknown names and unusable values are one ConfigError."""
    with pytest.raises(ConfigError, match=named):
        read_config_file(_write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path):
    """A config file that cannot be read stops start-up with its name."""
    with pytest.raises(ConfigError, match="--config"):
        read_config_file(str(tmp_path / "absent.toml"))


def test_reload_applies_valid_and_keeps_running_on_invalid(tmp_path):
    """A valid file is applied; an invalid one changes nothing."""
    path = _write(tmp_path, "STORAGE_TIMEOUT = 1\n")
    applied = []
    current = settings_with_file({}, {}, path)
    reloader = ConfigReloader(None, path, {}, {}, applied.append, current)
    _write(tmp_path, "STORAGE_TIMEOUT = 4\n")
    assert reloader.reload() is True
    assert applied[-1].storage_timeout == 4
    _write(tmp_path, "STORAGE_TIMEOUT = 4\nAUTH_TIMEOUT = soon\n")
    assert reloader.reload() is False
    assert len(applied) == 1


def test_defaults_unchanged_without_file():
    """Without --config the settings are the environment's."""
    assert settings_with_file({"PORT": "9"}, {}, None) == load_settings({"PORT": "9"})


def test_speedups_change_needs_a_restart():
    """SPEEDUPS shapes the transports and services already running, so a reload
    that changes it is reported as needing a restart."""
    from deltagw.process.reload import RESTART_ONLY

    assert "speedups" in RESTART_ONLY
