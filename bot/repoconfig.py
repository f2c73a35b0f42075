"""A repository's `.trimo/config.yml`: the model, its loader and the protected-path matcher."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from bot.errors import ConfigError
from bot.network import DEFAULT_PRESETS, HOST_EXPECTED, PRESETS, NetworkMode, valid_host_pattern

CONFIG_DIR = ".trimo"
CONFIG_NAMES = ("config.yml", "config.yaml")
DEFAULT_CONFIG_PATH = f"{CONFIG_DIR}/config.yml"
BASE_IMAGE = "trimo/base:bookworm"
DEFAULT_TIMEOUT_SECONDS = 30 * 60
MIN_TIMEOUT_SECONDS = 10
DEFAULT_IMAGE_BUILD_TIMEOUT = 30 * 60
MAX_TIMEOUT_SECONDS = 24 * 3600
MIN_MEMORY_BYTES = 6 * 1024**2  # Docker refuses less.
MIN_PIDS = 64
# Workflows, actions, CODEOWNERS and dependabot run or decide with the repository's rights; the
# repository's own Trimo configuration decides what runs with the run's secrets.
DEFAULT_PROTECTED_PATHS = (".github/**", ".trimo/**")

# Named agents a repository can pick with `agent.preset`: the real CLI on top of the repository's
# image (bot/agents, images/agents/<preset>/), run headless on the task file by the adapter its
# layer installs. A preset needs no secret in the container: its model calls go through the run's
# model gateway, which holds the key.
AGENT_ADAPTER = "/opt/trimo/agent/run"
AGENT_PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "claude-code": (AGENT_ADAPTER, ()),
    "codex": (AGENT_ADAPTER, ()),
    "aider": (AGENT_ADAPTER, ()),
}
DEFAULT_MAX_TURNS = 50

DURATION_EXPECTED = "a duration like 90s, 30m or 1h30m (between 10s and 24h)"
SIZE_EXPECTED = "a size like 512m or 4g (at least 6m)"
ENV_NAME_EXPECTED = "an environment variable name like ANTHROPIC_API_KEY (not starting with TRIMO_)"
# What each field accepts, in the words the error message uses; keys are dotted field paths
# with list indices removed.
EXPECTED: dict[str, str] = {
    "image": "a mapping with the keys dockerfile, build_timeout",
    "image.dockerfile": "a path inside .trimo/, like Dockerfile",
    "image.build_timeout": DURATION_EXPECTED,
    "agent": "a mapping with the keys command, preset, secrets, model, max_turns, budget",
    "agent.model": "a model name, like claude-sonnet-4-5",
    "agent.max_turns": "a whole number of turns between 1 and 1000",
    "agent.budget": "a mapping with the keys tokens, usd",
    "agent.budget.tokens": "a whole number of tokens greater than 0",
    "agent.budget.usd": "an amount of US dollars greater than 0, like 2.5",
    "agent.command": "a shell command (a string)",
    "agent.preset": "one of " + ", ".join(AGENT_PRESETS),
    "agent.secrets": "a list of environment variable names",
    "agent.secrets[]": ENV_NAME_EXPECTED,
    "test": "a mapping with the keys command, junit",
    "test.command": "a shell command (a string)",
    "test.junit": "a glob relative to $TRIMO_OUT, like junit.xml or reports/*.xml",
    "timeout": DURATION_EXPECTED,
    "resources": "a mapping with the keys cpus, memory, pids",
    "resources.cpus": "a number of CPUs greater than 0, like 2 or 0.5",
    "resources.memory": SIZE_EXPECTED,
    "resources.pids": f"a whole number of at least {MIN_PIDS}",
    "network": "a mapping with the keys mode, presets, allow",
    "network.mode": "one of " + ", ".join(m.value for m in NetworkMode),
    "network.presets": "a list of preset names: " + ", ".join(PRESETS),
    "network.presets[]": "one of " + ", ".join(PRESETS),
    "network.allow": "a list of host names",
    "network.allow[]": HOST_EXPECTED,
    "protected_paths": "a list of gitignore-style globs, like .github/**",
    "protected_paths[]": "a gitignore-style glob (a string)",
    "trigger_label": "a label name (a string)",
}
UNKNOWN_KEY = "unknown key; expected one of: {keys}"
NOT_A_MAPPING = "expected a mapping of settings (key: value), got {kind}"
INVALID_YAML = "invalid YAML: {problem}"
DOCKERFILE_MISSING = "expected a file inside .trimo/, but {name!r} does not exist"
PRESET_AND_COMMAND = "expected either agent.command or agent.preset, not both"

_DURATION = re.compile(r"(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s?)?")
_SIZE = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[bkmgt]?)b?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _fail(field: str, value: object) -> PydanticCustomError:
    return PydanticCustomError(
        "trimo", "expected {expected}, got {got}", {"expected": EXPECTED[field], "got": repr(value)}
    )


def parse_duration(value: object) -> int:
    """Seconds in `value`: an int of seconds or a string like 90s, 30m, 1h30m. ValueError if not."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip().lower())
        if match and any(match.groupdict().values()):
            parts = {k: int(v or 0) for k, v in match.groupdict().items()}
            return parts["h"] * 3600 + parts["m"] * 60 + parts["s"]
    raise ValueError(value)


def parse_size(value: object) -> int:
    """Bytes in `value`: an int of bytes or a Docker-style size like 512m or 4g."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            return int(float(match["n"]) * _SIZE_UNITS[match["unit"].lower()])
    raise ValueError(value)


def _duration_of(field: str) -> Callable[[object], int | None]:
    def check(value: object) -> int | None:
        if value is None:
            return None
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise _fail(field, value) from None
        if not MIN_TIMEOUT_SECONDS <= seconds <= MAX_TIMEOUT_SECONDS:
            raise _fail(field, value)
        return seconds

    return check


_duration = _duration_of("timeout")


def _size(value: object) -> int:
    try:
        size = parse_size(value)
    except ValueError:
        raise _fail("resources.memory", value) from None
    if size < MIN_MEMORY_BYTES:
        raise _fail("resources.memory", value)
    return size


def _secret_name(value: object) -> str:
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value) or value.startswith("TRIMO_"):
        raise _fail("agent.secrets[]", value)
    return value


def _preset(value: object) -> str:
    if not isinstance(value, str) or value not in PRESETS:
        raise _fail("network.presets[]", value)
    return value


def _mode(value: object) -> NetworkMode:
    if isinstance(value, NetworkMode):
        return value
    if isinstance(value, str) and value in NetworkMode._value2member_map_:
        return NetworkMode(value)
    raise _fail("network.mode", value)


def _host(value: object) -> str:
    if not isinstance(value, str) or not valid_host_pattern(value.lower().rstrip(".")):
        raise _fail("network.allow[]", value)
    return value.lower().rstrip(".")


# The old form, `network: bridge | none`, still reads: bridge meant the whole internet.
OLD_NETWORK_FORMS = {"bridge": NetworkMode.OPEN, "none": NetworkMode.NONE}
OLD_NETWORK_NOTE = (
    "network: {old!r} is the old form of this setting and now means {{mode: {mode}}}; "
    "write `network: {{mode: {mode}}}` (or drop it for the allowlist default) in .trimo/config.yml"
)


def _network(value: object) -> object:
    if isinstance(value, str) and value in OLD_NETWORK_FORMS:
        return {"mode": OLD_NETWORK_FORMS[value].value, "old_form": value}
    if isinstance(value, dict) and "old_form" in value:
        raise PydanticCustomError("trimo", UNKNOWN_KEY.format(keys="mode, presets, allow"))
    if value is not None and not isinstance(value, dict):
        raise _fail("network", value)
    return value


def _glob(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail("protected_paths[]", value)
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ImageConfig(_Section):
    dockerfile: str = "Dockerfile"
    # The longest the image build may take; the server's `image_build_timeout` is the most a
    # repository may ask for, so one repository's build cannot hold a worker for ever.
    build_timeout: Annotated[int | None, BeforeValidator(_duration_of("image.build_timeout"))] = (
        None
    )

    def build_timeout_within(self, server_limit: int) -> int:
        """The build's deadline: the repository's, capped by the server's."""
        if self.build_timeout is None:
            return server_limit
        return min(self.build_timeout, server_limit)

    @field_validator("dockerfile")
    @classmethod
    def _inside_trimo_dir(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not value or path.is_absolute() or ".." in path.parts:
            raise _fail("image.dockerfile", value)
        return value


class BudgetConfig(_Section):
    """The most a run's model calls may spend; the gateway refuses calls beyond it."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # `usd: 2` is a fine float

    tokens: int | None = Field(None, gt=0, strict=True)
    usd: float | None = Field(None, gt=0)


class AgentConfig(_Section):
    command: str | None = None
    preset: str | None = None
    secrets: list[Annotated[str, BeforeValidator(_secret_name)]] = Field(default_factory=list)
    model: str | None = None
    max_turns: int = Field(DEFAULT_MAX_TURNS, ge=1, le=1000)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in AGENT_PRESETS:
            raise _fail("agent.preset", value)
        return value

    @model_validator(mode="after")
    def _command_or_preset(self) -> AgentConfig:
        if self.command is not None and self.preset is not None:
            raise PydanticCustomError("trimo", PRESET_AND_COMMAND)
        return self


class TestConfig(_Section):
    __test__ = False  # not a pytest test class, despite the name

    command: str | None = None
    junit: str = "*.xml"


class ResourcesConfig(_Section):
    # Not strict: YAML gives `cpus: 2` as an int, which is a fine float.
    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = Field(2.0, gt=0)
    memory: Annotated[int, BeforeValidator(_size)] = Field(4 * 1024**3, validate_default=False)
    pids: int = Field(1024, ge=MIN_PIDS, strict=True)

    @property
    def memory_bytes(self) -> int:
        return self.memory


class NetworkConfig(_Section):
    """`network:` — what the run may reach (through the egress proxy beside it)."""

    mode: Annotated[NetworkMode, BeforeValidator(_mode)] = NetworkMode.ALLOWLIST
    presets: list[Annotated[str, BeforeValidator(_preset)]] = Field(
        default_factory=lambda: list(DEFAULT_PRESETS)
    )
    allow: list[Annotated[str, BeforeValidator(_host)]] = Field(default_factory=list)
    # Set when the file used `network: bridge|none`; never read from the file itself.
    old_form: str | None = Field(None, exclude=True)

    def old_form_note(self) -> str | None:
        if self.old_form is None:
            return None
        return OLD_NETWORK_NOTE.format(old=self.old_form, mode=self.mode.value)


class RepoConfig(_Section):
    """The validated `.trimo/config.yml`; every field has a default, so an empty file is valid."""

    image: ImageConfig = Field(default_factory=ImageConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    test: TestConfig = Field(default_factory=TestConfig)
    timeout: Annotated[int | None, BeforeValidator(_duration)] = None
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    network: Annotated[NetworkConfig, BeforeValidator(_network)] = Field(
        default_factory=NetworkConfig
    )
    protected_paths: list[Annotated[str, BeforeValidator(_glob)]] = Field(
        default_factory=lambda: list(DEFAULT_PROTECTED_PATHS)
    )
    trigger_label: str | None = None

    @property
    def timeout_seconds(self) -> int:
        """The run's time limit; the Trimo default when the repository sets none."""
        return self.timeout if self.timeout is not None else DEFAULT_TIMEOUT_SECONDS

    def timeout_or(self, default: int) -> int:
        """The repository's time limit, else `default` (e.g. the server's setting)."""
        return self.timeout if self.timeout is not None else default

    def agent_command(self) -> str | None:
        if self.agent.command is not None:
            return self.agent.command
        if self.agent.preset is not None:
            return AGENT_PRESETS[self.agent.preset][0]
        return None

    def secret_names(self) -> list[str]:
        """Secret names the agent gets: the preset's, then the configured ones, no repeats."""
        names = list(AGENT_PRESETS[self.agent.preset][1]) if self.agent.preset else []
        return list(dict.fromkeys([*names, *self.agent.secrets]))

    def dockerfile_path(self, root: Path) -> Path | None:
        """`.trimo/<dockerfile>` under checkout `root` when it exists; None means the base image."""
        path = root / CONFIG_DIR / self.image.dockerfile
        return path if path.is_file() else None


def parse_repo_config(text: str, path: str = DEFAULT_CONFIG_PATH) -> RepoConfig:
    """Validate config text; ConfigError names the file, the field and what it expects."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(path, where, INVALID_YAML.format(problem=problem)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, "(top level)", NOT_A_MAPPING.format(kind=_kind(data)))
    try:
        return RepoConfig.model_validate(data)
    except ValidationError as exc:
        raise _config_error(path, exc) from None


def load_repo_config(root: Path) -> RepoConfig:
    """The configuration in checkout `root` (`.trimo/config.yml` or `.yaml`); defaults if none."""
    for name in CONFIG_NAMES:
        file = root / CONFIG_DIR / name
        if file.is_file():
            rel = f"{CONFIG_DIR}/{name}"
            config = parse_repo_config(file.read_text(encoding="utf-8"), rel)
            if "dockerfile" in config.image.model_fields_set and not config.dockerfile_path(root):
                raise ConfigError(
                    rel, "image.dockerfile", DOCKERFILE_MISSING.format(name=config.image.dockerfile)
                )
            return config
    return RepoConfig()


def _kind(value: object) -> str:
    return {
        list: "a list",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "true/false",
    }.get(type(value), type(value).__name__)


def _config_error(path: str, exc: ValidationError) -> ConfigError:
    # One line per error is what people read; the first error is the one to fix first.
    error = exc.errors(include_url=False)[0]
    loc = [str(p) for p in error["loc"]]
    field = ".".join(p if not p.isdigit() else f"[{p}]" for p in loc).replace(".[", "[")
    key = re.sub(r"\[\d+\]", "[]", field)
    if error["type"] == "extra_forbidden":
        return ConfigError(path, field, UNKNOWN_KEY.format(keys=", ".join(_keys_at(loc[:-1]))))
    if error["type"] == "trimo":
        return ConfigError(path, field, error["msg"])
    expected = EXPECTED.get(key, EXPECTED.get(key.removesuffix("[]"), "a valid value"))
    return ConfigError(path, field, f"expected {expected}, got {_got(error)}")


def _got(error: Any) -> str:
    value = error.get("input")
    if isinstance(value, dict | list):
        return _kind(value)
    return repr(value)


def _keys_at(loc: list[str]) -> list[str]:
    model: type[BaseModel] = RepoConfig
    for part in loc:
        annotation = model.model_fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return [name for name, info in model.model_fields.items() if not info.exclude]


def _compile_glob(pattern: str) -> tuple[re.Pattern[str], bool] | None:
    pattern = pattern.strip()
    if not pattern or pattern.startswith("#"):
        return None
    negated = pattern.startswith("!")
    pattern = pattern.removeprefix("!").rstrip("/")
    # gitignore: a slash anywhere but the end anchors the pattern at the repository root.
    anchored = "/" in pattern
    pattern = pattern.lstrip("/")
    out = [] if anchored else ["(?:.*/)?"]
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    # A pattern naming a directory protects everything beneath it.
    out.append("(?:/.*)?")
    return re.compile("".join(out)), negated
