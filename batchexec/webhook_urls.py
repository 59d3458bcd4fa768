"""Which URLs a completion webhook may be sent to: ``CALLBACK_ALLOW``.

Webhooks are off unless the operator lists the origins batchexec may POST
to, so a key holder cannot make the server send requests to an arbitrary
internal address (its own metadata service, a database's HTTP port). Each
entry is ``scheme://host[:port]``:

- ``https://hooks.example.com`` allows that host on the scheme's default
  port (443), any path;
- ``https://*.example.com`` allows every host below ``example.com`` (not
  ``example.com`` itself);
- ``http://127.0.0.1:9000`` allows that port only; ``http://10.0.0.5:*``
  any port.

A host is compared by name, as written, after lower-casing and IDNA: the
address it resolves to is not checked, since the operator who lists a name
trusts it. URLs with credentials (``user:pass@``) or a fragment are refused,
the first because they would be stored and logged, the second because it is
never sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from yarl import URL

#: The longest callback URL accepted.
MAX_URL_CHARS = 2048
_SCHEMES = ("http", "https")


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    #: The host's name, or the domain below which any host goes (``*.`` entries).
    host: str
    below: bool
    #: None for any port.
    port: int | None

    def allows(self, url: URL) -> bool:
        host = url.raw_host or ""
        if url.scheme != self.scheme or (self.port is not None and url.port != self.port):
            return False
        return host.endswith("." + self.host) if self.below else host == self.host


class AllowList:
    """The origins of ``CALLBACK_ALLOW``; empty means webhooks are off."""

    def __init__(self, origins: tuple[_Origin, ...] = ()) -> None:
        self._origins = origins

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """The comma-separated entries of ``text``; ``ValueError`` names a bad one."""
        return cls(tuple(_origin(entry.strip()) for entry in text.split(",") if entry.strip()))

    def __bool__(self) -> bool:
        return bool(self._origins)

    def check(self, text: str) -> str:
        """``text`` as the URL to POST to, if it is one the list allows; else ``ValueError``
        saying why, in words a client can act on: what the URL is or must be (``"The
        callback_url " + message`` reads as a sentence)."""
        if not self._origins:
            raise ValueError(
                "cannot be used: completion webhooks are off on this server (the operator "
                "turns them on with CALLBACK_ALLOW)"
            )
        url = parse_url(text)
        if not any(origin.allows(url) for origin in self._origins):
            raise ValueError(
                "is not among the webhook targets this server allows (CALLBACK_ALLOW): "
                f"{url.scheme}://{url.host}:{url.port}"
            )
        return str(url)


def parse_url(text: str) -> URL:
    """``text`` as an absolute http(s) URL with a host, no credentials and no fragment."""
    if len(text) > MAX_URL_CHARS:
        raise ValueError(f"must be at most {MAX_URL_CHARS} characters")
    if not text.isprintable() or any(char.isspace() for char in text):
        raise ValueError("must not contain spaces or control characters")
    try:
        url = URL(text)
        url.port  # noqa: B018 - yarl checks the port's range when it is read
    except ValueError as exc:
        raise ValueError(f"is not a URL ({exc})") from None
    if url.scheme not in _SCHEMES or not url.raw_host:
        raise ValueError("must be an http:// or https:// URL with a host")
    if url.user is not None or url.password is not None:
        raise ValueError("must not carry a user name or password")
    if url.fragment:
        raise ValueError("must not have a #fragment")
    return url


def _origin(entry: str) -> _Origin:
    wildcard = "://*."
    below = wildcard in entry
    written = entry.replace(wildcard, "://", 1) if below else entry
    any_port = written.endswith(":*")
    if any_port:
        written = written[:-2]
    try:
        url = parse_url(written)
    except ValueError as exc:
        raise ValueError(f"{entry!r} {exc}") from None
    if url.raw_path not in ("", "/") or url.raw_query_string:
        raise ValueError(f"{entry!r} must be scheme://host[:port], without a path")
    return _Origin(
        scheme=url.scheme,
        host=url.raw_host or "",
        below=below,
        port=None if any_port else url.port,
    )
