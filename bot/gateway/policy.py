"""The server's model policy (providers, prices, the daily cap) and how usage reads to a person."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Provider:
    """Where one provider's calls go and which server secret holds its key."""

    name: str  # the gateway's path prefix: "anthropic", "openai"
    base_url: str
    secret: str  # e.g. ANTHROPIC_API_KEY
    header: str  # "x-api-key" or "authorization"


@dataclass(frozen=True)
class ModelPolicy:
    """The server's say on model calls: where they go, what they cost, what a day may spend."""

    anthropic_url: str = "https://api.anthropic.com"
    openai_url: str = "https://api.openai.com/v1"
    prices: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    daily_usd: float | None = None  # per installation and UTC day; None: no cap

    def providers(self) -> list[Provider]:
        return [
            Provider("anthropic", self.anthropic_url, "ANTHROPIC_API_KEY", "x-api-key"),
            Provider("openai", self.openai_url, "OPENAI_API_KEY", "authorization"),
        ]


def usage_line(usage: dict[str, Any] | None) -> str | None:
    """Tokens in/out and cost in one line, as the comment, the check run and the CLI show them."""
    if not usage:
        return None
    calls = int(usage.get("calls") or 0)
    return (
        f"{int(usage.get('input_tokens') or 0):,} tokens in, "
        f"{int(usage.get('output_tokens') or 0):,} out, ${float(usage.get('usd') or 0):.4f} "
        f"({calls} model call{'s' if calls != 1 else ''})"
    )
