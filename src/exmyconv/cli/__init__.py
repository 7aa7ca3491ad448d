"""Command line: click commands only (parse options, call the API, print; no logic of their own).

``main`` (the console script) runs the group with the one error policy. Imports: any floor below.
"""
from .main import main  # noqa: F401
