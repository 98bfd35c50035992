"""``caretakerctl``: an operator's commands for a running receiver.

::

    caretakerctl [--config caretaker.yml] pause NAME [--for 30m] [--reason TEXT]
    caretakerctl resume NAME
    caretakerctl reset NAME          # a spent budget: repairs again, next attempt at once
    caretakerctl problems [--service NAME] [--all]   # and the host this receiver repairs
    caretakerctl history [--service NAME] [--limit N]  # the audit trail, newest first, with each step

It reads the receiver's address, TLS and credentials (bearer token or basic auth) from
the config file and calls the receiver's API (``receiver/app.py``). Exit status: 0 done,
1 the receiver refused or could not be reached (the reason is printed), 2 a config error.
"""

from __future__ import annotations

import argparse
import base64
import json
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from exporter.cli import load_or_exit
from exporter.config import Config, ConfigError, read_secret

from .vocabulary import ProblemState

__all__ = ["main"]


def _auth_header(config: Config) -> dict[str, str]:
    recv = config.receiver
    if recv.bearer_token is not None:
        return {"Authorization": f"Bearer {read_secret(recv.bearer_token, config.base_dir)}"}
    if recv.basic_auth is not None:
        password = read_secret(recv.basic_auth.password, config.base_dir)
        pair = base64.b64encode(f"{recv.basic_auth.username}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


def _call(config: Config, method: str, path: str, body: dict[str, Any] | None = None,
          timeout: float = 10.0) -> dict[str, Any]:
    """One API call; raises ``RuntimeError`` with the receiver's reason on failure."""
    recv = config.receiver
    host = "127.0.0.1" if recv.listen_address in ("0.0.0.0", "::", "") else recv.listen_address
    scheme = "https" if recv.tls is not None else "http"
    url = f"{scheme}://{host}:{recv.port}{path}"
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **_auth_header(config)}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - our own URL
    context = None
    if recv.tls is not None:  # our own receiver, maybe with a self-signed certificate: trust that certificate
        context = ssl.create_default_context(cafile=str(config.resolve(recv.tls.cert_file)))
        context.check_hostname = False
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:  # noqa: S310
            result: dict[str, Any] = json.load(resp)
            return result
    except urllib.error.HTTPError as err:
        try:
            reason = json.load(err).get("error", err.reason)
        except ValueError:
            reason = err.reason
        raise RuntimeError(f"{method} {path}: HTTP {err.code}: {reason}") from err
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(f"cannot reach the receiver at {url}: {err}") from err


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    delta = ts - time.time()
    if abs(delta) < 1:
        return "now"
    return time.strftime("%H:%M:%S", time.localtime(ts)) + (f" (in {delta:.0f}s)" if delta > 0 else "")


def _print_problems(problems: list[dict[str, Any]]) -> None:
    print(f"{'ID':>5} {'SERVICE':<16} {'ALERT':<28} {'ACTION':<14} {'STATE':<8} {'SEEN':>5} {'TRIES':>5} "
          f"{'LAST DECISION':<22} NEXT ATTEMPT")
    for p in problems:
        state = p["state"] + (" (paused)" if p.get("paused") else "") + (" (exhausted)" if p.get("exhausted") else "")
        print(f"{p['id']:>5} {p['service_name']:<16} {p['alertname'][:28]:<28} {p['action'][:14]:<14} {state:<8} "
              f"{p['times_seen']:>5} {p['attempts']:>5} {p['last_decision'] or '-':<22} "
              f"{_when(p.get('next_attempt_at')) if p['state'] == ProblemState.OPEN else '-'}")


def _print_history(entries: list[dict[str, Any]]) -> None:
    """The audit trail (``GET /api/v1/remediations``), newest first: one line an entry
    (when, service, alert, what was decided and why, the result), then each step of a
    repair with its time from the start and what it observed first."""
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["received_at"]))
        what = e["decision"] + (f" ({e['reason']})" if e["reason"] else "")
        result = f" -> {e['result']} in {e['duration_seconds']:.2f}s" if e.get("result") and \
            e.get("duration_seconds") is not None else (f" -> {e['result']}" if e.get("result") else "")
        seen = f", seen {e['times_seen']}x" if e.get("times_seen", 1) > 1 else ""
        print(f"#{e['id']:<5} {when}  {e['service_name'] or '-'}  {e['alertname']} ({e['status']}{seen})  "
              f"{e['action'] or '-'}: {what}{result}")
        observation = e.get("observation") or {}
        if observation.get("condition"):
            print(f"         observed: {observation['condition']}")
        start = e.get("started_at") or e["received_at"]
        for step in e.get("steps") or []:
            message = str(step["message"]).replace("\n", "\n" + " " * 19)  # an argv with a script in it
            print(f"         {step['at'] - start:+7.2f}s  {message}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="caretakerctl", description="Commands for a running caretaker receiver.")
    parser.add_argument("--config", default="caretaker.yml", metavar="PATH")
    sub = parser.add_subparsers(dest="command", required=True)
    pause = sub.add_parser("pause", help="leave a service alone (an operator stops it on purpose)")
    pause.add_argument("service")
    pause.add_argument("--for", dest="duration", metavar="DURATION", help="e.g. 30m; default: until resumed")
    pause.add_argument("--reason", default="")
    sub.add_parser("resume", help="end a pause").add_argument("service")
    sub.add_parser("reset", help="re-enable repairs of a service whose budget is spent").add_argument("service")
    problems = sub.add_parser("problems", help="the problems the receiver works on")
    problems.add_argument("--service")
    problems.add_argument("--all", action="store_true", help="closed and expired ones too")
    problems.add_argument("--json", action="store_true")
    history = sub.add_parser("history", help="the audit trail: what was decided and done, newest first")
    history.add_argument("--service")
    history.add_argument("--limit", type=int, default=20, help="entries (default 20)")
    history.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    config = load_or_exit(args.config, False)
    try:
        if args.command == "pause":
            body: dict[str, Any] = {"reason": args.reason} if args.reason else {}
            if args.duration:
                body["duration"] = args.duration
            result = _call(config, "POST", f"/api/v1/services/{urllib.parse.quote(args.service)}/pause", body)
            print(f"{args.service}: paused until {_when(result['paused_until'])}" if result["paused_until"]
                  else f"{args.service}: paused until resumed")
        elif args.command in ("resume", "reset"):
            result = _call(config, "POST", f"/api/v1/services/{urllib.parse.quote(args.service)}/{args.command}")
            if args.command == "resume":
                print(f"{args.service}: resumed" + ("" if result["was_paused"] else " (it was not paused)"))
            else:
                print(f"{args.service}: budget reset" + (" (it was exhausted)" if result["was_exhausted"] else ""))
        elif args.command == "history":
            query = {k: v for k, v in (("service_name", args.service), ("limit", str(max(1, args.limit)))) if v}
            result = _call(config, "GET", "/api/v1/remediations?" + urllib.parse.urlencode(query))
            if args.json:
                print(json.dumps(result["data"], indent=2))
            else:
                _print_history(result["data"])
        else:
            wanted = "" if args.all else ProblemState.OPEN.value
            query = {k: v for k, v in (("service_name", args.service), ("state", wanted)) if v}
            result = _call(config, "GET", "/api/v1/problems?" + urllib.parse.urlencode(query))
            if args.json:
                print(json.dumps(result["data"], indent=2))
            else:
                _print_problems(result["data"])
                if result.get("host"):  # which host's problems these are (a fleet has many receivers)
                    print(f"host: {result['host']}")
    except ConfigError as err:
        print(err, file=sys.stderr)
        raise SystemExit(2) from err
    except RuntimeError as err:
        print(f"caretakerctl: {err}", file=sys.stderr)
        raise SystemExit(1) from err


if __name__ == "__main__":
    main()
