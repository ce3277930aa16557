"""Imported once by the forkserver (never by the gateway): everything a worker needs, then ``gc.freeze()``.

Each worker is a fork of the forkserver and shares these pages copy-on-write.  Freezing moves the imported
objects out of the collector's reach, so a worker's garbage collections do not touch (and thereby copy)
every shared page: that is most of what keeps an idle worker's unique memory small.
"""

from __future__ import annotations

import gc

import workers.agents.echo
import workers.agents.load
import workers.agents.shell
import workers.worker_main  # noqa: F401

gc.collect()
gc.freeze()
