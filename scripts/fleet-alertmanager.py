#!/usr/bin/env python3
"""Alertmanager configuration for a fleet: each host's repair alerts to that host's receivers.

    scripts/fleet-alertmanager.py hosts.yml > alertmanager.yml
    scripts/fleet-alertmanager.py --base /etc/alertmanager/alertmanager.yml hosts.yml > new.yml

It reads a base Alertmanager configuration (default: ``prometheus/alertmanager.yml``
beside this script) and a host list, and writes the base with its caretaker route (the
route whose receiver is ``--receiver``, default ``caretaker``) replaced, in the same
place, by one route per host: the same matchers and timings, plus ``host="NAME"``, to a
receiver ``caretaker-NAME`` whose webhooks are that host's receivers (two for an HA
pair, which share their state through Redis). The ``caretaker`` receiver is replaced by
those. Everything else (people's routes, receivers, inhibit rules, templates) is
written unchanged; YAML comments are not kept.

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

Exit status: 0 written, 2 a problem with either file (each problem named, nothing written).
Needs Python 3 and PyYAML only.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

BASE = Path(__file__).resolve().parent.parent / "prometheus" / "alertmanager.yml"
HOST_LABEL = "host"
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")
"""What ``receiver.host`` accepts (exporter/config/receiver.py)."""
URL = re.compile(r"^https?://[^\s/]+(/\S*)?$")


class Problems(Exception):
    def __init__(self, where: str, problems: list[str]) -> None:
        super().__init__(f"{where}:\n" + "\n".join(f"  {p}" for p in problems))


def read_hosts(path: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"urls": [...], "credentials_file": str | None}}`` (a host's own
    credentials_file, else the list's); raises :class:`Problems` naming every bad entry."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise Problems(str(path), [f"cannot read: {err}"]) from err
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
        if not isinstance(name, str) or not HOST_NAME.match(name):
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


def fleet_config(base: dict[str, Any], hosts: dict[str, dict[str, Any]], receiver: str = "caretaker",
                 where: str = "base") -> dict[str, Any]:
    """``base`` with its ``receiver`` route and receiver replaced by one of each per host."""
    config = copy.deepcopy(base)
    routes = (config.get("route") or {}).get("routes") or []
    index = next((i for i, r in enumerate(routes) if isinstance(r, dict) and r.get("receiver") == receiver), None)
    template = next((r for r in config.get("receivers") or [] if r.get("name") == receiver), None)
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
    hook = template["webhook_configs"][0]
    per_host_routes, per_host_receivers = [], []
    for name, spec in hosts.items():
        r = copy.deepcopy(route)
        r["receiver"] = f"{receiver}-{name}"
        r["matchers"] = [*(r.get("matchers") or []), f'{HOST_LABEL}="{name}"']
        if "group_by" in r and HOST_LABEL not in r["group_by"] and "..." not in r["group_by"]:
            r["group_by"] = [*r["group_by"], HOST_LABEL]
        r["continue"] = True  # the other hosts' routes and people's routes still see the alert
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
    routes[index:index + 1] = per_host_routes
    receivers = config["receivers"]
    at = receivers.index(template)
    receivers[at:at + 1] = per_host_receivers
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hosts", type=Path, help="the host list (YAML)")
    parser.add_argument("--base", type=Path, default=BASE,
                        help="the Alertmanager config to start from (default: %(default)s)")
    parser.add_argument("--receiver", default="caretaker", help="the receiver of the route to copy per host")
    args = parser.parse_args(argv)
    try:
        hosts = read_hosts(args.hosts)
        try:
            base = yaml.safe_load(args.base.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise Problems(str(args.base), [f"cannot read: {err}"]) from err
        if not isinstance(base, dict):
            raise Problems(str(args.base), ["not an Alertmanager configuration"])
        config = fleet_config(base, hosts, args.receiver, str(args.base))
    except Problems as err:
        print(f"fleet-alertmanager: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(f"# Generated by scripts/fleet-alertmanager.py from {args.base.name} and {args.hosts.name}:\n"
                     f"# one route and receiver per host ({', '.join(hosts)}). Edit those, not this.\n")
    sys.stdout.write(yaml.safe_dump(config, sort_keys=False, width=120))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
