"""Dask worker preload: a local worker ignores SIGINT (Ctrl-C goes to the whole process
group; only the drpipe process answers it, with one line and exit 130).

The parent cannot simply start its workers with SIGINT ignored (inherited): a Ctrl-C while
the cluster starts would then be lost, so it blocks SIGINT instead and each worker sets
this once it is up (pipeline/job.py ``_start_client``)."""

from __future__ import annotations

import signal


def dask_setup(worker) -> None:  # noqa: ARG001 - the preload hook's signature
    signal.signal(signal.SIGINT, signal.SIG_IGN)
