"""What a web server's configuration says it serves: the certificate files nginx and haproxy name.

Discovery reads configuration files beside certificate files (connectors/ssh_source.py): a certificate
file that a configuration names is recorded with how it is served (``Served``: the server, the
configuration file, the key file, where it listens, its server names and, for haproxy, a stats socket
at ``level admin``), which is what adoption turns into a deployment target (certpilot.adoption).

nginx: every ``server`` block's ``ssl_certificate`` / ``ssl_certificate_key`` pairs (in order; those of
the enclosing ``http`` block when the server has none), ``listen`` (its address or port) and
``server_name``. Comments, quoted words and nested blocks are read; ``include`` is not followed (give
the included files to discovery too: a file of bare ``server`` blocks is read the same way). A relative
path is taken from the configuration file's directory (nginx takes it from its prefix, which is that
directory for a main configuration given with ``-c``). A path holding a variable (``$ssl_server_name``)
cannot be known and is skipped.

haproxy: every ``bind`` line of a ``frontend`` or ``listen`` section with ``crt`` (a file, or a directory
of them; relative to the global ``crt-base``), and the global ``stats socket`` at ``level admin``. A
``crt-list`` is not read.

Pure functions over text: no file is opened here.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass
from typing import Any

__all__ = ["Served", "is_server_config", "parse", "parse_haproxy", "parse_nginx"]


@dataclass(frozen=True)
class Served:
    """One certificate file a server's configuration names, and how it is served."""

    server: str  # nginx or haproxy
    config: str  # the configuration file that names it
    certificate_path: str  # a file (nginx, haproxy) or a directory of files (haproxy)
    key_path: str | None = None  # nginx's ssl_certificate_key (haproxy reads the key from the same file)
    listen: tuple[str, ...] = ()  # nginx listen / haproxy bind addresses: 127.0.0.1:8443, *:443, 443, [::]:443
    server_names: tuple[str, ...] = ()
    runtime_socket: str | None = None  # haproxy: a stats socket at level admin (its runtime API)

    def as_dict(self) -> dict[str, Any]:
        return {"server": self.server, "config": self.config, "certificate_path": self.certificate_path,
                "key_path": self.key_path, "listen": list(self.listen), "server_names": list(self.server_names),
                "runtime_socket": self.runtime_socket}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Served:
        return cls(str(data["server"]), str(data["config"]), str(data["certificate_path"]), data.get("key_path"),
                   tuple(data.get("listen") or ()), tuple(data.get("server_names") or ()),
                   data.get("runtime_socket"))

    def serves(self, path: str) -> bool:
        """Whether this names the file ``path`` (itself, or haproxy's directory holding it)."""
        return path == self.certificate_path or (self.server == "haproxy"
                                                 and posixpath.dirname(path) == self.certificate_path.rstrip("/"))


_NGINX_HINT = re.compile(rb"(?:^|[\s;{}])ssl_certificate\s")
_HAPROXY_HINT = re.compile(rb"^\s*bind\s[^\n#]*\scrt(-list)?\s", re.MULTILINE)


def is_server_config(data: bytes) -> bool:
    """Whether ``data`` looks like an nginx or haproxy configuration that names certificate files."""
    return bool(_NGINX_HINT.search(data) or _HAPROXY_HINT.search(data))


def parse(data: bytes, path: str) -> list[Served]:
    """The certificate files the configuration ``data`` (the file ``path``) names; [] when it names none."""
    text = data.decode("utf-8", errors="replace")
    if _NGINX_HINT.search(data):
        return parse_nginx(text, path)
    if _HAPROXY_HINT.search(data):
        return parse_haproxy(text, path)
    return []


def _absolute(value: str, config: str, base: str | None = None) -> str | None:
    if "$" in value or not value:
        return None
    if value.startswith("/"):
        return posixpath.normpath(value)
    return posixpath.normpath(posixpath.join(base or posixpath.dirname(config) or "/", value))


# ------------------------------------------------------------------------------------------- nginx

_TOKEN = re.compile(r"""\s+|#[^\n]*|"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'|([{};])|((?:[^\s"'{};#\\]|\\.)+)""",
                    re.DOTALL)


@dataclass
class _Block:
    name: str
    args: list[str]
    children: list[_Block]


def _nginx_tree(text: str) -> list[_Block]:
    root: list[_Block] = []
    stack: list[list[_Block]] = [root]
    words: list[str] = []
    for match in _TOKEN.finditer(text):
        double, single, punct, bare = match.groups()
        if double is not None or single is not None:
            words.append(re.sub(r"\\(.)", r"\1", double if double is not None else single))
        elif bare is not None:
            words.append(re.sub(r"\\(.)", r"\1", bare))
        elif punct == ";":
            if words:
                stack[-1].append(_Block(words[0], words[1:], []))
            words = []
        elif punct == "{":
            block = _Block(words[0] if words else "", words[1:], [])
            stack[-1].append(block)
            stack.append(block.children)
            words = []
        elif punct == "}":
            words = []
            if len(stack) > 1:
                stack.pop()
    return root


def _pairs(directives: list[_Block], config: str) -> list[tuple[str, str | None]]:
    certificates = [d.args[0] for d in directives if d.name == "ssl_certificate" and d.args]
    keys = [d.args[0] for d in directives if d.name == "ssl_certificate_key" and d.args]
    out = []
    for i, certificate in enumerate(certificates):
        path = _absolute(certificate, config)
        if path is not None:
            out.append((path, _absolute(keys[i], config) if i < len(keys) else None))
    return out


def parse_nginx(text: str, path: str) -> list[Served]:
    """The certificate files each ``server`` block of an nginx configuration serves."""
    found: list[Served] = []

    def walk(blocks: list[_Block], inherited: list[tuple[str, str | None]]) -> None:
        own = _pairs(blocks, path) or inherited
        for block in blocks:
            if block.name == "server" and block.children:
                pairs = _pairs(block.children, path) or own
                listen = tuple(d.args[0] for d in block.children if d.name == "listen" and d.args)
                names = tuple(n for d in block.children if d.name == "server_name" for n in d.args)
                found.extend(Served("nginx", path, certificate, key, listen, names) for certificate, key in pairs)
            elif block.name in ("http", "") and block.children:
                walk(block.children, own)

    walk(_nginx_tree(text), [])
    return found


# ----------------------------------------------------------------------------------------- haproxy

_SECTIONS = ("global", "defaults", "frontend", "backend", "listen", "peers", "resolvers", "userlist", "program",
             "mailers", "cache", "ring", "http-errors")


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote: read it as plain words
        return line.split("#", 1)[0].split()


def parse_haproxy(text: str, path: str) -> list[Served]:
    """The certificate files each ``bind ... crt`` of a haproxy configuration serves."""
    section = ""
    crt_base: str | None = None
    socket: str | None = None
    binds: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        words = _words(line)
        if not words:
            continue
        if words[0] in _SECTIONS:
            section = words[0]
            continue
        if section == "global" and words[0] == "crt-base" and len(words) > 1:
            crt_base = _absolute(words[1], path)
        elif section == "global" and words[:2] == ["stats", "socket"] and len(words) > 2:
            levels = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "level"]
            if "admin" in levels and not words[2].startswith(("ipv4@", "ipv6@")) and ":" not in words[2]:
                socket = _absolute(words[2].removeprefix("unix@"), path)
        elif section in ("frontend", "listen") and words[0] == "bind" and len(words) > 1:
            binds.append((words[1], words[2:]))
    found: list[Served] = []
    for address, params in binds:
        for i, word in enumerate(params[:-1]):
            if word == "crt":
                target = _absolute(params[i + 1], path, crt_base)
                if target is not None:
                    found.append(Served("haproxy", path, target, None, (address,), (), socket))
    return found
