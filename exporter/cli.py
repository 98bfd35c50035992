"""Command-line plumbing shared by ``caretaker-exporter`` and ``caretaker-receiver``."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import Config, ConfigError, load_config

EXIT_CONFIG = 2
"""Exit status for an invalid configuration (DESIGN.md)."""


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default="caretaker.yml", metavar="PATH",
                        help="configuration file (default: %(default)s)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration, print the result and exit (0 valid, 2 invalid)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def load_or_exit(path: str, check_only: bool) -> Config:
    """Load the config; on error print every problem to stderr and exit with status 2."""
    try:
        config = load_config(path)
    except ConfigError as err:
        print(f"{err.source}: invalid configuration:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from err
    if check_only:
        print(f"{path}: valid ({len(config.services)} services: {', '.join(config.services)})")
        raise SystemExit(0)
    return config


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
