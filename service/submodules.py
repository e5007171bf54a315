"""Submodules of a pushed commit: which commit each gitlink wants, and from which URL.

Reads ``.gitmodules`` as committed (``git config --blob``, never a file on disk) and resolves
each URL the way ``git submodule`` does: ``./`` and ``../`` against the superproject's own URL;
an absolute URL only over SSH and only to a host on ``BRANCHBUILD_SUBMODULE_HOSTS``, so a
repository can never make the service connect anywhere else or run a transport helper
(``ext::``, ``fd::``). Fetching and merging the trees is :class:`service.git.Git`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

from .errors import SubmoduleError

_SAFE_URL = re.compile(r"[A-Za-z0-9._~:/@%+=-]+")


@dataclass(frozen=True)
class Gitlink:
    """One submodule of a commit: its path in the tree, its name, URL and wanted commit."""

    path: str
    name: str
    url: str
    commit: str


def parse_gitmodules(listing: bytes) -> dict[str, tuple[str, str | None]]:
    """``git config -z --list`` of a ``.gitmodules`` blob: path -> (name, raw URL or None)."""
    paths: dict[str, str] = {}
    urls: dict[str, str] = {}
    for item in listing.split(b"\0"):
        key, _, value = item.decode("utf-8", "surrogateescape").partition("\n")
        if not key.startswith("submodule."):
            continue
        name, _, field = key.removeprefix("submodule.").rpartition(".")
        if field == "path":
            paths[name] = value
        elif field == "url":
            urls[name] = value
    return {path: (name, urls.get(name)) for name, path in paths.items()}


def resolve_url(base: str, url: str, allowed_hosts: tuple[str, ...], label: str) -> str:
    """The URL to fetch submodule ``label`` from: relative URLs against ``base`` (the
    superproject's URL), absolute ones only ``ssh://`` to an allowed host.

    Raises:
        SubmoduleError: the URL is not allowed or not understood.
    """
    if url.startswith(("./", "../")):
        scheme, sep, rest = base.partition("://")
        prefix, path = (
            (f"{scheme}://" + rest.partition("/")[0], rest.partition("/")[2]) if sep else ("", base)
        )
        segments = [part for part in path.split("/") if part]
        for part in url.split("/"):
            if part == "..":
                if len(segments) < 2:
                    raise SubmoduleError(f"submodule {label}: {url!r} leaves the host's paths")
                segments.pop()
            elif part not in ("", "."):
                segments.append(part)
        resolved = prefix + "/" + "/".join(segments)
    else:
        parts = urlsplit(url)
        if parts.scheme != "ssh" or not parts.hostname:
            raise SubmoduleError(
                f"submodule {label}: URL {url!r} is not relative and not ssh://: only relative "
                "URLs and ssh:// URLs to hosts on BRANCHBUILD_SUBMODULE_HOSTS are fetched"
            )
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if not any(fnmatchcase(host, p) or fnmatchcase(parts.hostname, p) for p in allowed_hosts):
            raise SubmoduleError(
                f"submodule {label}: host {host} of {url!r} is not on BRANCHBUILD_SUBMODULE_HOSTS"
            )
        resolved = url
    if not _SAFE_URL.fullmatch(resolved) or "::" in resolved or "/../" in resolved + "/":
        raise SubmoduleError(f"submodule {label}: URL {resolved!r} is not a plain URL")
    return resolved


def with_user(url: str, user: str) -> str:
    """``url`` (ssh://) with its user name replaced by ``user`` (our SSH key id), if any."""
    if not user or not url.startswith("ssh://"):
        return url
    rest = url.removeprefix("ssh://")
    authority, slash, path = rest.partition("/")
    host = authority.rpartition("@")[2]
    return f"ssh://{user}@{host}{slash}{path}"


def gitlinks(tree_listing: bytes) -> list[tuple[str, str]]:
    """(path, commit) of every gitlink in ``git ls-tree -r -z`` output."""
    found = []
    for entry in tree_listing.split(b"\0"):
        meta, _, path = entry.partition(b"\t")
        fields = meta.split()
        if len(fields) >= 3 and fields[0] == b"160000":
            found.append((path.decode("utf-8", "surrogateescape"), fields[2].decode()))
    return found
