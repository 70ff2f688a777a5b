"""The old name of tests/helpers.py, kept only until the branches whose new tests import it are
merged; import from helpers instead."""
from helpers import *  # noqa: F401,F403
