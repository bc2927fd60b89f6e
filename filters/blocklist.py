"""Caption keyword and URL/domain blocklists (safety: reasons start with "unsafe:").

Both are "row" filters: a blocked row is never fetched. Lists come inline (`words:`,
`domains:`, `prefixes:`) and/or from a text file (`path:`: one entry a line, `#` starts
a comment line). A file path is made absolute where the config is read, because the
workers that use it may run elsewhere (they must see the same path, like the output).
"""

from __future__ import annotations

import ipaddress
import html
import re
import unicodedata
from typing import Optional
from urllib.parse import urlsplit

from pydantic import Field, PrivateAttr, field_validator, model_validator

from curate.filters.base import SAFETY, Decision, Filter, Rejection
from curate.filters.lists import existing_file, read_list_file
from curate.pipeline.urls import normalize_host


# --- caption keywords ------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


def _visible(text: str) -> str:
    """HTML entities decoded (&#98;ad → bad) and invisible format characters removed (zero-width
    spaces and joiners, soft hyphens, the combining grapheme joiner), so neither can split a word."""
    text = html.unescape(html.unescape(text))
    return "".join(c for c in text if c != "\u034f" and unicodedata.category(c) != "Cf")


def words_of(text: str) -> tuple[str, ...]:
    """Text as comparable words: entities decoded and invisible characters removed, NFKC-normalized
    (fullwidth ＢＡＤ → BAD, ligatures split), case-folded (Straße → strasse), split on everything
    that is not a letter or digit."""
    return tuple(_WORD.findall(unicodedata.normalize("NFKC", _visible(text)).casefold()))


class CaptionBlocklist(Filter):
    """Drop captions containing a listed word or phrase, as whole words: "bad" blocks
    "Bad dog" and "ＢＡＤ", not "badge". A phrase ("bad word") matches those words in a
    row, whatever punctuation or spacing lies between them.

    Words are runs of letters and digits, so scripts written without spaces (Chinese,
    Japanese, Thai) only match where the entry is a whole run.
    """

    name = "caption_blocklist"

    priority = SAFETY
    stage = "row"
    words: list[str] = Field(default_factory=list)
    path: Optional[str] = None

    _phrases: set[tuple[str, ...]] = PrivateAttr(default_factory=set)
    _longest: int = PrivateAttr(0)

    @field_validator("path")
    @classmethod
    def _file_exists(cls, path: Optional[str]) -> Optional[str]:
        return existing_file(path)

    @model_validator(mode="after")
    def _load(self):
        entries = list(self.words) + list(read_list_file(self.path) if self.path else [])
        self._phrases = {w for w in map(words_of, entries) if w}
        if not self._phrases:
            raise ValueError("give at least one word, in words: or in the file at path:")
        self._longest = max(map(len, self._phrases))
        return self

    def keep(self, sample) -> Decision:
        words = words_of(sample.get("caption") or "")
        # Every run of up to `longest` words is looked up: cost grows with the caption,
        # not with the list, so a list of a million entries is as fast as one of ten.
        phrases = self._phrases  # a local: pydantic's private attributes are slow to reach
        for n in range(1, self._longest + 1):
            for i in range(len(words) - n + 1):
                if words[i:i + n] in phrases:
                    return self.reject("unsafe: caption_blocklist")
        return True


# --- URLs and domains ----------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _normalize_url(url: str) -> Optional[str]:
    """Scheme and host normalized (they are case-insensitive), the rest as given."""
    try:
        parts = urlsplit(url.strip())
        host = normalize_host(parts.hostname or "")
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return None
    netloc = f"[{host}]" if ":" in host else host
    rest = parts.path + (f"?{parts.query}" if parts.query else "")
    return f"{parts.scheme.lower()}://{netloc}{port}{rest}"


class UrlBlocklist(Filter):
    """Drop rows whose URL is on a blocked domain or starts with a blocked prefix.

    A domain blocks itself and its subdomains: "example.com" blocks "cdn.example.com",
    not "notexample.com". Hosts are compared case-insensitively in their IDNA form; an IP
    address entry blocks that address only. `prefixes` are full URLs ("https://host/path/").
    """

    name = "url_blocklist"

    priority = SAFETY
    stage = "row"
    domains: list[str] = Field(default_factory=list)
    path: Optional[str] = None  # a file of domains
    prefixes: list[str] = Field(default_factory=list)

    _domains: set[str] = PrivateAttr(default_factory=set)
    _prefixes: tuple[str, ...] = PrivateAttr(default_factory=tuple)

    @field_validator("path")
    @classmethod
    def _file_exists(cls, path: Optional[str]) -> Optional[str]:
        return existing_file(path)

    @model_validator(mode="after")
    def _load(self):
        domains = set()
        for entry in list(self.domains) + list(read_list_file(self.path) if self.path else []):
            if "/" in entry:
                raise ValueError(f"domain {entry!r} looks like a URL; list URLs under prefixes:")
            domains.add(normalize_host(entry.removeprefix("*.")))
        self._domains = domains
        prefixes = []
        for prefix in self.prefixes:
            normalized = _normalize_url(prefix)
            if normalized is None or "://" not in prefix:
                raise ValueError(f"prefix {prefix!r} is not a URL (scheme://host/...)")
            prefixes.append(normalized)
        self._prefixes = tuple(prefixes)
        if not self._domains and not self._prefixes:
            raise ValueError("give at least one domain (domains: or path:) or URL prefix (prefixes:)")
        return self

    def blocked_domain(self, host: str) -> bool:
        host = normalize_host(host)
        if _is_ip(host):
            return host in self._domains
        labels = host.split(".")
        return any(".".join(labels[i:]) in self._domains for i in range(len(labels)))

    def url_rejection(self, url: str) -> Optional[Rejection]:
        """The rejection of `url`, or None. The download stage also asks it about every
        redirect target, so a redirect cannot lead onto a blocked domain (such rows are
        counted as kept by this filter, rejected by the fetch with this rejection)."""
        try:
            host = urlsplit(url.strip()).hostname or ""
        except ValueError:
            return None  # not a URL: the fetch rejects it with its own reason
        if self._domains and self.blocked_domain(host):
            return self.reject("unsafe: url_blocklist")
        if self._prefixes:
            normalized = _normalize_url(url)
            if normalized is not None and normalized.startswith(self._prefixes):
                return self.reject("unsafe: url_blocklist")
        return None

    def keep(self, sample) -> Decision:
        return self.url_rejection(sample.get("url") or "") or True
