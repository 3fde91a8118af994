"""Sphinx configuration for the buildbot-ec2-hybrid documentation.

Built with warnings as errors by tests/test_docs.py (``sphinx-build -W -b html docs <out>``).
"""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent
_INIT = DOCS.parent / "buildbot_ec2_hybrid" / "__init__.py"

project = "buildbot-ec2-hybrid"
author = "buildbot-ec2-hybrid contributors"
copyright = "the buildbot-ec2-hybrid contributors"
# Read, not imported: building the docs must not need Buildbot installed.
release = re.search(r'^__version__ = "([^"]+)"', _INIT.read_text(encoding="utf-8"), re.M).group(1)
version = release

extensions: list[str] = []
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
html_theme_options = {"description": "Overflow a Buildbot farm onto stopped EC2 instances"}
pygments_style = "sphinx"
