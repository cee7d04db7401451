"""Text for calibration and evaluation: tokenizers, offline and online corpora, calibration and evaluation windows
(:mod:`proxjax.data.text`)."""

from proxjax.data.text import *  # noqa: F403  (the public names of text.py, listed in its __all__)
from proxjax.data.text import __all__  # noqa: F401
