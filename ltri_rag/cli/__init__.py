"""The ``ltri-rag`` command line: ingest files, ask and chat with answers cited by document and offsets, list and
check the store, a one-command demo, and pictures (``inspect``, ``bench``). Run ``ltri-rag --help`` (or ``python -m
ltri_rag.cli --help``); parsing imports nothing heavy, each command imports what it needs when it runs.

Modules: :mod:`~ltri_rag.cli.app` (parser, :func:`main`, exit codes), :mod:`~ltri_rag.cli.commands` (the commands),
:mod:`~ltri_rag.cli.demo`, :mod:`~ltri_rag.cli.inspection` (``inspect``), :mod:`~ltri_rag.cli.bench` (``bench``),
:mod:`~ltri_rag.cli.plots` (the PNGs), :mod:`~ltri_rag.cli.documents` (input files), :mod:`~ltri_rag.cli.session`
(model and store opening), :mod:`~ltri_rag.cli.runtime` (output, ``--config``, the store folder).
"""

from ltri_rag.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
