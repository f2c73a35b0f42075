"""The network of a run that has none: where its container and its model gateway meet.

A run whose network mode is `none` has no RunNetwork (no proxy, no way out); an agent preset
still needs its gateway. The run then gets a network of its own made like every run's network
(internal, no address on the host) that holds the gateway alone.
"""

from __future__ import annotations

from bot.runtime import ContainerSpec, DockerRuntime


def run_network(runtime: DockerRuntime, spec: ContainerSpec) -> str:
    """Create the network named after the run's container; the caller removes it at the end."""
    if not spec.name:
        raise ValueError("a run's network is named after its container, which has no name")
    return runtime.create_network(spec.name, spec)
