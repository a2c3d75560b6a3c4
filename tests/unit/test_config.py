"""Settings: option beats environment beats default; bad values name themselves."""

from __future__ import annotations

import ipaddress

import pytest

from deltagw.config import ConfigError, load_settings
from deltagw.tap import Options


def test_defaults_match_the_documented_ones():
    """With nothing set, the defaults README's Configuration table lists apply."""
    settings = load_settings({})
    assert settings.port == "tcp:8000:backlog=1024"
    assert settings.service_name == "api-gateway"
    assert (settings.auth_url, settings.storage_url, settings.analytics_url) == (
        "http://auth:8001",
        "http://storage:8003",
        "http://analytics:8004",
    )
    assert (settings.auth_timeout, settings.storage_timeout, settings.analytics_timeout) == (10, 10, 30)
    assert settings.verify_timeout == 5
    assert settings.cors_origins == ("*",)
    assert settings.max_body_bytes == 1048576
    assert settings.trusted_proxies == ()


def test_option_beats_environment_beats_default():
    """An option wins over its variable, which wins over the default."""
    env = {"PORT": "9000", "SERVICE_NAME": "from-env", "STORAGE_SERVICE_URL": "http://s:1/"}
    settings = load_settings(env, {"port": "tcp:9100:interface=127.0.0.1", "service-name": None})
    assert settings.port == "tcp:9100:interface=127.0.0.1"
    assert settings.service_name == "from-env"
    assert settings.storage_url == "http://s:1"


def test_twistd_options_feed_settings():
    """The plugin's options parse into the same settings names."""
    options = Options()
    options.parseOptions(["--port", "8123", "--auth-url", "https://auth.internal"])
    settings = load_settings({}, dict(options))
    assert (settings.port, settings.auth_url) == ("tcp:8123:backlog=1024", "https://auth.internal")


def test_decimal_timeouts_and_lists():
    """Timeouts take decimals; CORS origins and trusted proxies take lists."""
    settings = load_settings(
        {
            "ANALYTICS_TIMEOUT": "2.5",
            "CORS_ORIGINS": "https://a.example, https://b.example/",
            "TRUSTED_PROXIES": "10.0.0.0/8, ::1",
        }
    )
    assert settings.analytics_timeout == 2.5
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize(
    "env, named",
    [
        ({"AUTH_TIMEOUT": "ten"}, "AUTH_TIMEOUT"),
        ({"AUTH_TIMEOUT": "0"}, "AUTH_TIMEOUT"),
        ({"VERIFY_TIMEOUT": "nan"}, "VERIFY_TIMEOUT"),
        ({"STORAGE_SERVICE_URL": "storage:8003"}, "STORAGE_SERVICE_URL"),
        ({"ANALYTICS_SERVICE_URL": "http://a/?x=1"}, "ANALYTICS_SERVICE_URL"),
        ({"PORT": "70000"}, "PORT"),
        ({"PORT": "tcp:abc"}, "PORT"),
        ({"PORT": "carrier-pigeon:1"}, "PORT"),
        ({"MAX_BODY_BYTES": "1MB"}, "MAX_BODY_BYTES"),
        ({"CORS_ORIGINS": "*, https://a.example"}, "CORS_ORIGINS"),
        ({"TRUSTED_PROXIES": "not-a-network"}, "TRUSTED_PROXIES"),
        ({"SERVICE_NAME": " "}, "SERVICE_NAME"),
    ],
)
def test_bad_value_names_the_setting(env, named):
    """Each unusable value raises one line that names its setting."""
    with pytest.raises(ConfigError) as raised:
        load_settings(env)
    message = str(raised.value)
    assert message.startswith(named) and "\n" not in message


def test_bad_option_names_the_option():
    """A bad option value is reported under the option's name."""
    with pytest.raises(ConfigError, match=r"^--port="):
        load_settings({}, {"port": "nope:1"})


def test_the_largest_stored_answer_never_exceeds_the_cache():
    """A CACHE_MAX_BYTES below CACHE_MAX_ENTRY_BYTES (its default included) bounds both."""
    settings = load_settings({"CACHE_MAX_BYTES": "1000000"})
    assert (settings.cache_max_bytes, settings.cache_max_entry_bytes) == (1_000_000, 1_000_000)
    settings = load_settings({"CACHE_MAX_BYTES": "2000000", "CACHE_MAX_ENTRY_BYTES": "1000"})
    assert (settings.cache_max_bytes, settings.cache_max_entry_bytes) == (2_000_000, 1000)
