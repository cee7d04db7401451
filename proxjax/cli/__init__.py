"""The ``proxjax`` command line (:mod:`proxjax.cli.main`): argparse → typed configuration → workflow → print."""

from proxjax.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
