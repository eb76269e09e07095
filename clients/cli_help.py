"""The help formatter of the command-line tools (sparse-serve, sparse-eval, sparse-loadtest)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and "(default: X)" after every option that has a default worth showing: not
    ``None`` (such options say in their help what happens without them), not a flag's ``False``, and not
    when the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "(default" in text:
            return text
        return super()._get_help_string(action) or text
