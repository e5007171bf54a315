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


def parse_gitmodules(listing: bytes) -> dict[str, tuple[str, str | None, str | None]]:
    """``git config -z --list`` of a ``.gitmodules`` blob: path -> (name, raw URL or None,
    its ``update`` value or None)."""
    paths: dict[str, str] = {}
    fields: dict[tuple[str, str], str] = {}
    for item in listing.split(b"\0"):
        key, _, value = item.decode("utf-8", "surrogateescape").partition("\n")
        if not key.startswith("submodule."):
            continue
        name, _, field = key.removeprefix("submodule.").rpartition(".")
        if field == "path":
            paths[name] = value
        elif field in ("url", "update"):
            fields[name, field] = value
    return {
        path: (name, fields.get((name, "url")), fields.get((name, "update")))
        for name, path in paths.items()
    }


def checked_out(update: str | None, label: str) -> bool:
    """Whether ``git submodule update --init`` checks a submodule with this ``update`` value
    (from ``.gitmodules``) out: not for ``none``.

    Raises:
        SubmoduleError: a value git refuses (a ``!command`` among them): the checkout fails.
    """
    if update is None or update in ("checkout", "rebase", "merge"):
        return True
    if update == "none":
        return False
    raise SubmoduleError(
        f"submodule {label}: .gitmodules sets update = {update!r}, which git submodule update "
        "refuses (a command is never taken from .gitmodules)"
    )


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
        if host.startswith("-") or (parts.username or "").startswith("-"):
            raise SubmoduleError(f"submodule {label}: URL {url!r} would be an ssh option")
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


# First line of each submodule root's attributes in a composed tree: the superproject's
# checkout attributes do not reach into a submodule (the submodule's own lines follow).
UNSET_CHECKOUT_ATTRIBUTES = b"* !text !eol !crlf !ident !filter !working-tree-encoding"

_BLANK = b" \t\r\n"
_MACRO = b"[attr]"
# git's own macro, defined in every repository.
_BUILTIN_MACROS = {b"binary": [b"-diff", b"-merge", b"-text"]}


def scoped_attributes(files: dict[str, bytes], boundaries: list[str]) -> dict[str, bytes]:
    """The ``.gitattributes`` files of a composed tree (path -> content; ``boundaries``: the
    submodules' paths) rewritten so that each file means in the composed tree what it means
    in its own repository's checkout: every submodule root starts with
    :data:`UNSET_CHECKOUT_ATTRIBUTES`, and macros (``[attr]name ...``) stay in their
    repository. git reads macro definitions only from the top-level ``.gitattributes``: a
    submodule's own would be ignored there, and the superproject's would expand in a
    submodule's files. So inside a submodule, every macro name of the superproject or of the
    submodule is renamed (``branchbuild-submodule-<n>-<name>``) and the submodule's
    definitions move, renamed, to the top-level file."""
    out = dict(files)
    for boundary in boundaries:
        key = f"{boundary}/.gitattributes"
        out[key] = UNSET_CHECKOUT_ATTRIBUTES + b"\n" + out.get(key, b"")
    superproject = _macros(files.get(".gitattributes", b""))
    definitions: list[bytes] = []
    for number, boundary in enumerate(boundaries):
        own = _macros(files.get(f"{boundary}/.gitattributes", b""))
        names = set(superproject) | set(own) | set(_BUILTIN_MACROS)
        prefix = f"branchbuild-submodule-{number}-".encode()
        for path in out:
            if _scope(path, boundaries) == boundary:
                out[path] = _renamed(out[path], names, prefix)
        for name, states in (_BUILTIN_MACROS | own).items():
            renamed = b" ".join(_rename(s, names, prefix) for s in states)
            definitions.append(_MACRO + prefix + name + b" " + renamed)
    if definitions:
        top = out.get(".gitattributes", b"")
        out[".gitattributes"] = (top + b"\n" if top else b"") + b"\n".join(definitions) + b"\n"
    return out


def _scope(path: str, boundaries: list[str]) -> str:
    """The innermost submodule holding ``path`` ("" for the superproject's own files)."""
    inside = [b for b in boundaries if path.startswith(b + "/")]
    return max(inside, key=len, default="")


def _split(line: bytes) -> tuple[bytes, list[bytes]] | None:
    """(pattern, attribute states) of an attributes line, None for a blank line or a comment
    (git's parse_attr_line: a pattern is C-quoted if it starts with a double quote)."""
    rest = line.lstrip(_BLANK)
    if not rest or rest.startswith(b"#"):
        return None
    end = -1
    if rest.startswith(b'"'):
        i = 1
        while i < len(rest) and rest[i : i + 1] != b'"':
            i += 2 if rest[i : i + 1] == b"\\" else 1
        end = i + 1 if i < len(rest) else -1
    if end < 0:
        end = len(rest)
        for blank in _BLANK:
            found = rest.find(bytes([blank]))
            if 0 <= found < end:
                end = found
    return rest[:end], rest[end:].split()


def _macros(content: bytes) -> dict[bytes, list[bytes]]:
    """The macros a top-level attributes file defines: name -> its states."""
    found: dict[bytes, list[bytes]] = {}
    for line in content.split(b"\n"):
        parsed = _split(line)
        if parsed is not None and parsed[0].startswith(_MACRO) and len(parsed[0]) > len(_MACRO):
            found[parsed[0].removeprefix(_MACRO)] = parsed[1]
    return found


def _renamed(content: bytes, names: set[bytes], prefix: bytes) -> bytes:
    lines = []
    for line in content.split(b"\n"):
        parsed = _split(line)
        if parsed is None:
            lines.append(line)
        elif parsed[0].startswith(_MACRO):
            lines.append(b"")  # moved to the top-level file (or ignored by git: not top-level)
        else:
            pattern, states = parsed
            lines.append(b" ".join([pattern, *(_rename(s, names, prefix) for s in states)]))
    return b"\n".join(lines)


def _rename(state: bytes, names: set[bytes], prefix: bytes) -> bytes:
    """``name``, ``-name``, ``!name`` or ``name=value`` with ``name`` prefixed if in ``names``."""
    sign = state[:1] if state[:1] in (b"-", b"!") else b""
    name, equals, value = state[len(sign) :].partition(b"=")
    return sign + prefix + name + equals + value if name in names else state
