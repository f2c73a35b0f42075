"""The run's own network: where the run's container and its gateway meet.

This is the one place that decides which network a run's container and its model gateway share.
The network is internal (no route out of the engine): the agent reaches the gateway by name and
nothing else through it.
"""

from __future__ import annotations

import time

from bot.runtime import LABEL_MANAGED, LABEL_PIPELINE, LABEL_RUN, LABEL_STORE, DockerRuntime


def run_network(runtime: DockerRuntime, run_id: int, pipeline_id: int, store: str) -> str:
    """Create the run's internal network; the caller removes it when the run ends."""
    name = f"trimo-run-{run_id}-{int(time.time() * 1000)}"
    labels = {
        LABEL_MANAGED: "1",
        LABEL_RUN: str(run_id),
        LABEL_PIPELINE: str(pipeline_id),
        LABEL_STORE: store,
    }
    return runtime.create_network(name, labels, internal=True)
