#!/usr/bin/env python3
"""Alertmanager configuration for a fleet: each host's repair alerts to that host's receivers.

    scripts/fleet-alertmanager.py hosts.yml -o alertmanager.yml
    scripts/fleet-alertmanager.py --base /etc/alertmanager/alertmanager.yml hosts.yml -o new.yml \\
        --targets /etc/prometheus/targets/*.yml

It reads a base Alertmanager configuration (default: ``prometheus/alertmanager.yml``
beside this script) and a host list, and writes the base with its caretaker route (the
route under ``route.routes`` whose receiver is ``--receiver``, default ``caretaker``)
replaced, in the same place, by one route per host: the same matchers, timings and
``continue``, plus ``host="NAME"``, grouped by ``host`` too, to a receiver
``caretaker-NAME`` whose webhooks are that host's receivers (two for an HA pair, which
share their state through Redis). The ``caretaker`` receiver is replaced by those.

Everything else (people's routes, receivers, templates) is written unchanged, but for
one thing: an inhibit rule whose ``equal`` lacks ``host`` gets it (said on stderr),
since in a fleet one host's alert must never inhibit another host's repair alerts. YAML
comments are not kept.

The written file starts with a comment that records the base's caretaker route and
receiver, so the script can take its own output as ``--base`` (adding a host to a file
you keep, not the base): it puts that route and receiver back in place of the per-host
ones first. Running it twice gives the same file.

Checks before anything is written (each problem named, exit status 2, nothing written):
the host list (mapping keys are kept as written, ``no`` or ``1.10`` included, and a host
listed twice is an error), that no other route still sends to ``caretaker`` (it is
gone), that every route's receiver exists and no two receivers share a name (a host
``ops`` beside a receiver ``caretaker-ops`` of your own). With ``--targets`` (Prometheus
file_sd target files), that every host the targets name has a route: a host Prometheus
scrapes but the list lacks would get no repairs, and nothing would say so.

``-o FILE`` is written atomically (a temporary file renamed over it), and only when
every check passed; it must not be the base. Without ``-o`` the file goes to stdout.

The host list (YAML)::

    credentials_file: /etc/alertmanager/secrets/caretaker-token   # optional: every host's
    hosts:                                    # token file, else the base receiver's
      web-1: {urls: ["http://10.0.0.11:8931/alerts"]}
      web-2:
        urls: ["http://10.0.0.12:8931/alerts", "http://10.0.0.12:8932/alerts"]  # an HA pair
        credentials_file: /etc/alertmanager/secrets/web-2-token

A host's name is the ``host`` label Prometheus gives its targets, and its receivers'
``receiver.host`` (docs/fleet.md). A relative ``credentials_file`` is relative to the
directory of the written alertmanager.yml, as Alertmanager reads it.

Exit status: 0 written, 2 a problem with a file (each problem named, nothing written).
Needs Python 3 and PyYAML only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

BASE = Path(__file__).resolve().parent.parent / "prometheus" / "alertmanager.yml"
HOST_LABEL = "host"
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")
"""What ``receiver.host`` accepts (exporter/config/receiver.py)."""
URL = re.compile(r"^https?://[^\s/]+(/\S*)?$")
MARK = "# fleet-alertmanager: "
"""Starts the comment line of a written file that records the base's caretaker route and receiver (JSON)."""
ADDRESS_HOST = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)(?::[0-9]+)?$")
"""The host part of a target address, as the relabeling of prometheus/fleet/prometheus.yml
takes it when a target has no ``host`` label (an IPv6 address gives none)."""


class Problems(Exception):
    def __init__(self, where: str, problems: list[str]) -> None:
        super().__init__(f"{where}:\n" + "\n".join(f"  {p}" for p in problems))


class StrictLoader(yaml.SafeLoader):
    """The safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.mapping_key(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"the key {key!r} is given twice (first {seen[key]})", key_node.start_mark)
            seen[key] = f"line {key_node.start_mark.line + 1}"
        return {self.mapping_key(k): self.construct_object(v, deep=deep) for k, v in node.value}

    def mapping_key(self, node: yaml.Node) -> Any:
        key = self.construct_object(node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a scalar", node.start_mark)
        return key


class HostsLoader(StrictLoader):
    """:class:`StrictLoader` that keeps every mapping key as written: a host ``no`` or
    ``1.10`` stays that string (YAML 1.1 would make them ``False`` and ``1.1``)."""

    def mapping_key(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a scalar", node.start_mark)
        return node.value


def load(path: Path, loader: type[StrictLoader]) -> tuple[str, Any]:
    """The text of ``path`` and what it holds; raises :class:`Problems`."""
    try:
        text = path.read_text()
        reader = loader(text)
        reader.name = str(path)  # for the marks of an error
        try:
            return text, reader.get_single_data()
        finally:
            reader.dispose()
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise Problems(str(path), [f"cannot read: {err}"]) from err


def read_hosts(path: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"urls": [...], "credentials_file": str | None}}`` (a host's own
    credentials_file, else the list's); raises :class:`Problems` naming every bad entry."""
    _, data = load(path, HostsLoader)
    problems: list[str] = []
    if not isinstance(data, dict):
        raise Problems(str(path), ["must be a mapping with the key hosts"])
    problems += [f"{key}: unknown key" for key in data if key not in ("hosts", "credentials_file")]
    default = data.get("credentials_file")
    if default is not None and not (isinstance(default, str) and default):
        problems.append("credentials_file: must be a path")
    hosts = data.get("hosts")
    if not isinstance(hosts, dict) or not hosts:
        problems.append("hosts: must map each host name to {urls: [...]}")
        raise Problems(str(path), problems)
    out: dict[str, dict[str, Any]] = {}
    for name, spec in hosts.items():
        where = f"hosts.{name}"
        if not HOST_NAME.match(name):
            problems.append(f"{where}: a host name is letters, digits, '_', '.' and '-', starting with a letter "
                            "or digit (as receiver.host)")
            continue
        if not isinstance(spec, dict):
            problems.append(f"{where}: must be a mapping with urls")
            continue
        problems += [f"{where}.{key}: unknown key" for key in spec if key not in ("urls", "credentials_file")]
        urls = spec.get("urls")
        if not isinstance(urls, list) or not urls:
            problems.append(f"{where}.urls: must be a list of the host's receiver URLs")
            continue
        problems += [f"{where}.urls[{i}]: not an http(s) URL: {u!r}" for i, u in enumerate(urls)
                     if not (isinstance(u, str) and URL.match(u))]
        creds = spec.get("credentials_file", default)
        if creds is not None and not (isinstance(creds, str) and creds):
            problems.append(f"{where}.credentials_file: must be a path")
        out[name] = {"urls": urls, "credentials_file": creds}
    if problems:
        raise Problems(str(path), problems)
    return out


def target_hosts(paths: list[Path]) -> dict[str, str]:
    """Every host that Prometheus file_sd target files (YAML or JSON lists of
    ``{targets: [...], labels: {...}}``) give their targets, each with the first file
    that names it: a target's ``host`` label, or else the host part of its address, as
    prometheus/fleet/prometheus.yml relabels. Raises :class:`Problems`."""
    found: dict[str, str] = {}
    for path in paths:
        _, groups = load(path, StrictLoader)
        if not isinstance(groups, list):
            raise Problems(str(path), ["a target file is a list of {targets: [...], labels: {...}}"])
        for i, group in enumerate(groups):
            if not isinstance(group, dict) or not isinstance(group.get("targets", []), list):
                raise Problems(str(path), [f"[{i}]: must be a mapping with a list of targets"])
            label = (group.get("labels") or {}).get(HOST_LABEL)
            for address in group.get("targets", []):
                match = ADDRESS_HOST.match(str(address))
                host = str(label) if label else match.group(1) if match else None
                if host is not None:
                    found.setdefault(host, str(path))
    return found


def walk(route: dict[str, Any], where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(place, route)`` for a route and every route under it (``route.routes[1].routes[0]``)."""
    yield where, route
    for i, child in enumerate(route.get("routes") or []):
        if isinstance(child, dict):
            yield from walk(child, f"{where}.routes[{i}]")


def restore(config: dict[str, Any], text: str, where: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A config this script wrote, with its per-host routes and receivers replaced by the
    base's caretaker route and receiver that its comment line records, and that record;
    any other config as it is, and None."""
    line = next((line for line in text.splitlines() if line.startswith(MARK)), None)
    if line is None:
        return config, None
    try:
        mark = json.loads(line[len(MARK):])
        route, template, made = mark["route"], mark["receiver_config"], mark["made"]
        if not (isinstance(route, dict) and isinstance(template, dict) and isinstance(made, list)):
            raise TypeError("route, receiver_config, made")
    except (ValueError, KeyError, TypeError) as err:
        raise Problems(where, [f"the line {MARK.strip()} ... does not parse ({err}); generate from the base"]) from err
    routes = (config.get("route") or {}).get("routes") or []
    at = [i for i, r in enumerate(routes) if isinstance(r, dict) and r.get("receiver") in made]
    receivers = config.get("receivers") or []
    kept = [i for i, r in enumerate(receivers) if isinstance(r, dict) and r.get("name") in made]
    if not at or not kept:
        raise Problems(where, [f"written by this script, but its per-host routes or receivers ({', '.join(made)}) "
                               "are gone; generate from the base"])
    config["route"]["routes"] = [*routes[:at[0]], route,
                                 *(r for i, r in enumerate(routes) if i > at[0] and i not in at)]
    config["receivers"] = [*receivers[:kept[0]], template,
                           *(r for i, r in enumerate(receivers) if i > kept[0] and i not in kept)]
    return config, mark


def fleet_config(base: dict[str, Any], hosts: dict[str, dict[str, Any]], receiver: str = "caretaker",
                 where: str = "base", notes: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``base`` with its ``receiver`` route and receiver replaced by one of each per host,
    and ``host`` added to each inhibit rule's ``equal`` that lacks it (a line in
    ``notes`` for each); and the record of what was replaced, for :func:`restore`.
    Raises :class:`Problems` naming each problem of the result."""
    config = copy.deepcopy(base)
    if not isinstance(config.get("route"), dict):
        raise Problems(where, ["route: missing (not an Alertmanager configuration)"])
    routes = config["route"].get("routes") or []
    index = next((i for i, r in enumerate(routes) if isinstance(r, dict) and r.get("receiver") == receiver), None)
    receivers = config.get("receivers") or []
    template = next((r for r in receivers if isinstance(r, dict) and r.get("name") == receiver), None)
    problems = []
    if index is None:
        problems.append(f"route.routes: no route to the receiver {receiver!r} (the route to copy per host)")
    if template is None or len(template.get("webhook_configs") or []) != 1:
        problems.append(f"receivers: no receiver {receiver!r} with one webhook_config (the webhook to copy per host)")
    if problems:
        raise Problems(where, problems)
    assert index is not None and template is not None
    route = routes[index]
    if any(k in route for k in ("match", "match_re")):
        raise Problems(where, [f"route.routes[{index}]: use matchers, not the deprecated match/match_re"])
    mark = {"receiver": receiver, "route": copy.deepcopy(route), "receiver_config": copy.deepcopy(template),
            "made": [f"{receiver}-{name}" for name in hosts]}
    hook = template["webhook_configs"][0]
    per_host_routes, per_host_receivers = [], []
    for name, spec in hosts.items():
        r = copy.deepcopy(route)  # its `continue` too: what follows it sees the alert as it did before
        r["receiver"] = f"{receiver}-{name}"
        r["matchers"] = [*(r.get("matchers") or []), f'{HOST_LABEL}="{name}"']
        if "group_by" in r and HOST_LABEL not in r["group_by"] and "..." not in r["group_by"]:
            r["group_by"] = [*r["group_by"], HOST_LABEL]
        per_host_routes.append(r)
        webhooks = []
        for url in spec["urls"]:
            w = copy.deepcopy(hook)
            w["url"] = url
            if spec["credentials_file"] is not None:
                auth = w.setdefault("http_config", {}).setdefault("authorization", {"type": "Bearer"})
                auth["credentials_file"] = spec["credentials_file"]
            webhooks.append(w)
        per_host_receivers.append({**copy.deepcopy(template), "name": f"{receiver}-{name}",
                                   "webhook_configs": webhooks})
    check(config, index, mark["made"], receiver, where)
    routes[index:index + 1] = per_host_routes
    at = receivers.index(template)
    receivers[at:at + 1] = per_host_receivers
    for i, rule in enumerate(config.get("inhibit_rules") or []):
        equal = rule.get("equal") if isinstance(rule, dict) else None
        if isinstance(equal, list) and equal and HOST_LABEL not in equal:
            rule["equal"] = [HOST_LABEL, *equal]
            if notes is not None:
                notes.append(f"inhibit_rules[{i}]: equal {equal} lacks {HOST_LABEL}: added it, so that an alert of "
                             "one host never inhibits another host's (and its repair)")
    return config, mark


def check(base: dict[str, Any], index: int, made: list[str], receiver: str, where: str) -> None:
    """Raise :class:`Problems` naming each place of ``base`` that the written config would
    get wrong: a route other than ``route.routes[index]`` (the one made per host) that
    sends to ``receiver``, which is gone then, or to a receiver that is not defined; two
    receivers of one name, or one of the base named as a host's receiver (``made``)."""
    problems = []
    listed = [r.get("name") for r in base.get("receivers") or [] if isinstance(r, dict)]
    problems += [f"receivers: {name!r} is defined {listed.count(name)} times" for name in dict.fromkeys(listed)
                 if listed.count(name) > 1]
    problems += [f"receivers: {name!r} is also the name of a host's receiver ({receiver}-HOST): rename yours, "
                 "or the host" for name in dict.fromkeys(listed) if name in made]
    names = {*listed, *made} - {receiver}
    copied = base["route"]["routes"][index]
    for place, route in walk(base["route"], "route"):
        name = route.get("receiver")
        if route is copied:
            continue
        if name == receiver:
            problems.append(f"{place}: sends to {receiver!r}, which the per-host receivers replace (only "
                            f"route.routes[{index}] is made per host): send it to a host's receiver, or drop it")
        elif name is not None and name not in names:
            problems.append(f"{place}: the receiver {name!r} is not defined")
    if problems:
        raise Problems(where, problems)


def render(config: dict[str, Any], mark: dict[str, Any], hosts: dict[str, dict[str, Any]], base_name: str,
           hosts_name: str) -> str:
    """The file: a header that names the sources, the record of the base's route and
    receiver (one JSON line), the config."""
    return (f"# Generated by scripts/fleet-alertmanager.py from {base_name} and {hosts_name}:\n"
            f"# one route and receiver per host ({', '.join(hosts)}). Edit those, not this; the next line\n"
            f"# lets the script take this file as its --base (it restores the route and receiver from it).\n"
            f"{MARK}{json.dumps(mark, separators=(',', ':'), default=str)}\n"
            + yaml.safe_dump(config, sort_keys=False, width=120))


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``:
    ``path`` holds the old text or the new, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def stdout_is(path: Path) -> bool:
    try:
        out, base = os.fstat(sys.stdout.fileno()), os.stat(path)
    except (OSError, ValueError):
        return False
    return (out.st_dev, out.st_ino) == (base.st_dev, base.st_ino)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hosts", type=Path, help="the host list (YAML)")
    parser.add_argument("--base", type=Path, default=BASE,
                        help="the Alertmanager config to start from, or a file this script wrote "
                             "(default: %(default)s)")
    parser.add_argument("--receiver", default="caretaker", help="the receiver of the route to copy per host")
    parser.add_argument("-o", "--output", type=Path,
                        help="write here (atomically, and only if every check passed) instead of to stdout")
    parser.add_argument("--targets", type=Path, nargs="+", default=[], metavar="FILE",
                        help="Prometheus file_sd target files: every host they name must be in the host list")
    args = parser.parse_args(argv)
    notes: list[str] = []
    try:
        if args.output is not None and same_file(args.output, args.base):
            raise Problems(str(args.output), ["is the base: write elsewhere, check it, then move it over the base"])
        if args.output is None and stdout_is(args.base):
            raise Problems(str(args.base), ["is also stdout (--base X > X): the shell emptied it before this "
                                            "script ran; restore it, and write with -o"])
        hosts = read_hosts(args.hosts)
        text, base = load(args.base, StrictLoader)
        if not isinstance(base, dict):
            raise Problems(str(args.base), ["not an Alertmanager configuration"])
        base, previous = restore(base, text, str(args.base))
        receiver = previous["receiver"] if previous else args.receiver
        config, mark = fleet_config(base, hosts, receiver, str(args.base), notes)
        # A file regenerated from itself keeps the name of the base it first came from.
        mark["base_name"] = str(previous.get("base_name", args.base.name)) if previous else args.base.name
        if args.targets:
            missing = {host: path for host, path in target_hosts(args.targets).items() if host not in hosts}
            if missing:
                raise Problems(str(args.hosts), [f"hosts.{host}: missing, but {path} has targets of it: its repair "
                                                 "alerts would reach no receiver" for host, path in missing.items()])
        out = render(config, mark, hosts, mark["base_name"], args.hosts.name)
        if args.output is not None:
            write_atomically(args.output, out)
    except Problems as err:
        print(f"fleet-alertmanager: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"fleet-alertmanager: {args.output}: cannot write: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"fleet-alertmanager: {args.base}: {note}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
