"""Command-line plumbing shared by ``caretaker-exporter`` and ``caretaker-receiver``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .config import Config, ConfigError, load_config, machine_problems, schema_text

EXIT_CONFIG = 2
"""Exit status for an invalid configuration (docs/design.md, "One configuration file")."""


class _PrintSchema(argparse.Action):
    """``--print-schema``: print the config's JSON Schema and exit, like ``--version``."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        sys.stdout.write(schema_text())
        parser.exit(0)


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default="caretaker.yml", metavar="PATH",
                        help="configuration file (default: %(default)s)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration, and look up the programs it runs and their working "
                             "directories; print the result and exit (0 valid, 2 invalid)")
    parser.add_argument("--print-schema", action=_PrintSchema,
                        help="print the configuration's JSON Schema (docs/caretaker.schema.json) and exit")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _fail(source: str, problems: list[str]) -> SystemExit:
    print(f"{source}: invalid configuration:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return SystemExit(EXIT_CONFIG)


def load_or_exit(path: str, check_only: bool, refusals: Callable[[Config], list[str]] | None = None,
                 warn: bool = False) -> Config:
    """Load the config; on error print every problem to stderr and exit with status 2.

    ``refusals`` gives what this program cannot do with a valid config (the receiver: a
    user it cannot become); they exit 2 too. With ``check_only``, the programs the config
    runs and their working directories are looked up as well, as errors, and the result
    is printed and the process exits (0 valid, 2 not). Otherwise, with ``warn``, those
    are printed as warnings: a program may appear later (a volume mounted after boot,
    a package installed), and a repair that needs it fails then, recorded and retried.
    """
    try:
        config = load_config(path, machine=check_only)
    except ConfigError as err:
        raise _fail(err.source, err.problems) from err
    refused = refusals(config) if refusals is not None else []
    if refused:
        raise _fail(path, refused)
    if check_only:
        print(f"{path}: valid ({len(config.services)} services: {', '.join(config.services)})")
        raise SystemExit(0)
    if warn:
        for problem in machine_problems(config):
            print(f"{path}: warning: {problem}", file=sys.stderr)
    return config


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
