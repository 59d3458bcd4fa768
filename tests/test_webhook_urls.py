"""``CALLBACK_ALLOW``: which webhook targets an allow-list lets through, and bad entries."""

from __future__ import annotations

import pytest

from batchexec.config import load_settings
from batchexec.errors import ConfigError
from batchexec.webhook_urls import AllowList

ALLOW = AllowList.parse(
    "https://hooks.example.com, https://*.corp.example, http://127.0.0.1:9000, "
    "http://10.0.0.5:*, https://Bücher.example"
)


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/batches?token=x",
        "https://hooks.example.com:443/",
        "https://HOOKS.example.com/in",
        "https://a.corp.example/in",
        "https://deep.a.corp.example/in",
        "http://127.0.0.1:9000/in",
        "http://10.0.0.5:1/x",
        "http://10.0.0.5:65535/x",
        "https://xn--bcher-kva.example/in",
        "https://bücher.example/in",
    ],
)
def test_an_allowed_url_passes(url):
    assert ALLOW.check(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com/in",  # another scheme
        "https://hooks.example.com:8443/in",  # another port than the default
        "https://corp.example/in",  # *. is below the domain, not the domain
        "https://evilcorp.example/in",
        "https://hooks.example.com.evil.test/in",
        "http://127.0.0.1:9001/in",
        "http://127.0.0.1/in",
        "http://localhost:9000/in",
        "http://[::1]:9000/in",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.6:80/",
    ],
)
def test_a_url_outside_the_list_is_refused(url):
    with pytest.raises(ValueError, match="is not among the webhook targets"):
        ALLOW.check(url)


def test_an_empty_list_turns_webhooks_off():
    off = AllowList.parse(" , ")
    assert not off
    with pytest.raises(ValueError, match="off on this server"):
        off.check("https://hooks.example.com/in")


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("ftp://files.example", "http:// or https://"),
        ("hooks.example.com", "http:// or https://"),
        ("https://hooks.example.com/path", "without a path"),
        ("https://hooks.example.com?q=1", "without a path"),
        ("https://user@hooks.example.com", "user name"),
        ("https://hooks.example.com:70000", "is not a URL"),
    ],
)
def test_a_bad_entry_stops_start_up_naming_the_variable(entry, says):
    with pytest.raises(ConfigError, match=f"^CALLBACK_ALLOW: .*{says}"):
        load_settings(_env_file=None, callback_allow=entry, callback_secret="s")


def test_webhooks_on_need_a_secret_and_a_default_url_must_be_allowed():
    with pytest.raises(ConfigError, match=r"^CALLBACK_SECRET must be set"):
        load_settings(_env_file=None, callback_allow="https://hooks.example.com")
    with pytest.raises(
        ConfigError, match=r"^CALLBACK_URL is not among .*: https://elsewhere\.example:443$"
    ):
        load_settings(
            _env_file=None,
            callback_allow="https://hooks.example.com",
            callback_secret="s",
            callback_url="https://elsewhere.example/in",
        )
    with pytest.raises(
        ConfigError, match=r"^CALLBACK_URL cannot be used: completion webhooks are off"
    ):
        load_settings(_env_file=None, callback_url="https://hooks.example.com/in")
    settings = load_settings(
        _env_file=None,
        callback_allow="https://hooks.example.com",
        callback_secret="s",
        callback_url="https://hooks.example.com/in",
    )
    assert settings.callbacks
    assert "s" not in repr(settings.callback_secret)
