"""Agent presets: a real coding agent CLI on top of the repository's image, run headless.

Each preset names its image layer (images/agents/<preset>/), the provider its model calls go to
(through the run's model gateway), the environment that points the CLI at the gateway, and the
parser that turns the CLI's event stream into transcript steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bot.agents.aider import AiderParser
from bot.agents.claude_code import ClaudeCodeParser
from bot.agents.codex import CodexParser
from bot.agents.transcript import Parser, Step

__all__ = ["PRESETS", "Parser", "Preset", "Step", "preset"]

# Inside every agent layer, the adapter that runs the CLI on the task file.
ADAPTER = "/opt/trimo/agent/run"


@dataclass(frozen=True)
class Preset:
    name: str
    provider: str  # the gateway route: "anthropic" or "openai"
    default_model: str
    parser: Callable[[], Parser]

    def env(
        self, gateway_url: str, token: str, model: str | None, max_turns: int
    ) -> dict[str, str]:
        """What the adapter and the CLI read: the gateway's address and the per-run token."""
        env = {
            "TRIMO_AGENT_MODEL": model or self.default_model,
            "TRIMO_AGENT_MAX_TURNS": str(max_turns),
            "TRIMO_GATEWAY_URL": gateway_url,
        }
        if self.provider == "anthropic":
            env.update({"ANTHROPIC_BASE_URL": gateway_url, "ANTHROPIC_API_KEY": token})
        else:
            env.update({"OPENAI_BASE_URL": gateway_url + "/v1", "OPENAI_API_KEY": token})
        return env


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("claude-code", "anthropic", "claude-sonnet-4-5", ClaudeCodeParser),
        Preset("codex", "openai", "gpt-5-codex", CodexParser),
        Preset("aider", "openai", "gpt-4.1", AiderParser),
    )
}


def preset(name: str | None) -> Preset | None:
    return PRESETS.get(name) if name else None
