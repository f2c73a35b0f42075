"""`.trimo/config.yml`: defaults, every field's error message, presets, protected paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.errors import ConfigError
from bot.network import NetworkMode
from bot.paths import is_protected
from bot.repoconfig import (
    AGENT_PRESETS,
    DEFAULT_TIMEOUT_SECONDS,
    load_repo_config,
    parse_repo_config,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "repo-config.example.yml"


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_repo_config(text)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_an_empty_file_gives_the_defaults() -> None:
    config = parse_repo_config("")
    assert config.timeout_seconds == DEFAULT_TIMEOUT_SECONDS
    assert config.timeout_or(600) == 600
    assert config.agent_command() is None and config.secret_names() == []
    assert config.test.command is None and config.test.junit == "*.xml"
    assert (config.resources.cpus, config.resources.memory_bytes, config.resources.pids) == (
        2.0,
        4 * 1024**3,
        1024,
    )
    assert config.network.mode == NetworkMode.ALLOWLIST
    assert config.network.presets == ["debian", "pypi", "npm"] and config.network.allow == []
    assert config.protected_paths == [".github/**", ".trimo/**"]
    assert config.trigger_label is None


@pytest.mark.parametrize(
    ("path", "protected"),
    [
        (".github/workflows/ci.yml", True),
        (".github/actions/setup/action.yml", True),
        (".github/CODEOWNERS", True),
        (".github/dependabot.yml", True),
        (".trimo/config.yml", True),
        (".trimo/preboot.sh", True),
        ("src/.github/notes.md", False),
        ("docs/github.md", False),
        ("README.md", False),
    ],
)
def test_by_default_github_and_trimo_files_are_protected(path: str, protected: bool) -> None:
    assert is_protected(path, parse_repo_config("").protected_paths) is protected


def test_the_example_configuration_is_valid() -> None:
    config = parse_repo_config(EXAMPLE.read_text(), str(EXAMPLE))
    assert config.agent_command() is not None
    assert config.test.command is not None


def test_a_full_configuration_is_read() -> None:
    config = parse_repo_config(
        """
image: {dockerfile: Dockerfile.dev}
agent:
  command: my-agent --task-file "$TRIMO_TASK_FILE"
  secrets: [ANTHROPIC_API_KEY, GITHUB_READ_TOKEN]
test:
  command: pytest --junitxml="$TRIMO_OUT/junit.xml"
  junit: junit.xml
timeout: 1h30m
resources: {cpus: 0.5, memory: 512m, pids: 256}
network: none
protected_paths: [".github/**", "*.pem"]
trigger_label: robot
"""
    )
    assert config.image.dockerfile == "Dockerfile.dev"
    assert config.agent_command() == 'my-agent --task-file "$TRIMO_TASK_FILE"'
    assert config.secret_names() == ["ANTHROPIC_API_KEY", "GITHUB_READ_TOKEN"]
    assert config.timeout_seconds == 5400 and config.timeout_or(60) == 5400
    assert config.resources.memory_bytes == 512 * 1024**2
    assert (config.resources.cpus, config.resources.pids) == (0.5, 256)
    assert config.network.mode == NetworkMode.NONE and config.trigger_label == "robot"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("timeout: 90s", 90),
        ("timeout: 30m", 1800),
        ("timeout: 2h", 7200),
        ("timeout: 600", 600),
        ("timeout: '45'", 45),
        ("timeout: 24h", 86400),
    ],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_repo_config(text).timeout_seconds == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512m", 512 * 1024**2),
        ("4g", 4 * 1024**3),
        ("4G", 4 * 1024**3),
        ("1.5g", 1536 * 1024**2),
        ("2048mb", 2 * 1024**3),
        ("1073741824", 1024**3),
    ],
)
def test_memory_sizes(text: str, size: int) -> None:
    assert parse_repo_config(f"resources: {{memory: '{text}'}}").resources.memory_bytes == size


def test_a_preset_supplies_the_command_and_no_model_key() -> None:
    config = parse_repo_config("agent: {preset: claude-code, secrets: [EXTRA]}")
    assert config.agent_command() == AGENT_PRESETS["claude-code"][0]
    # The model key stays in the run's gateway: a preset asks for no secret in the container.
    assert config.secret_names() == ["EXTRA"]
    for _command, secrets in AGENT_PRESETS.values():
        assert secrets == ()


def test_agent_budget_turns_and_model() -> None:
    config = parse_repo_config(
        "agent: {preset: codex, model: gpt-5, max_turns: 12, budget: {tokens: 50000, usd: 2}}"
    )
    assert config.agent.budget.tokens == 50000 and config.agent.budget.usd == 2.0
    assert config.agent.max_turns == 12 and config.agent.model == "gpt-5"
    assert parse_repo_config("agent: {preset: aider}").agent.budget.usd is None


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("agent: {budget: {tokens: 0}}", "agent.budget.tokens"),
        ("agent: {budget: {usd: -1}}", "agent.budget.usd"),
        ("agent: {budget: {dollars: 3}}", "agent.budget.dollars"),
        ("agent: {max_turns: 0}", "agent.max_turns"),
    ],
)
def test_a_bad_budget_names_its_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_repo_config(text)
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "resources: {memory: lots}",
            "resources.memory: expected a size like 512m or 4g (at least 6m), got 'lots'",
        ),
        (
            "resources: {memory: 1k}",
            "resources.memory: expected a size like 512m or 4g (at least 6m), got '1k'",
        ),
        (
            "resources: {cpus: 0}",
            "resources.cpus: expected a number of CPUs greater than 0, like 2 or 0.5, got 0",
        ),
        (
            "resources: {cpus: many}",
            "resources.cpus: expected a number of CPUs greater than 0, like 2 or 0.5, got 'many'",
        ),
        ("resources: {pids: 10}", "resources.pids: expected a whole number of at least 64, got 10"),
        (
            "resources: {gpus: 1}",
            "resources.gpus: unknown key; expected one of: cpus, memory, pids",
        ),
        (
            "resources: 4g",
            "resources: expected a mapping with the keys cpus, memory, pids, got '4g'",
        ),
        (
            "timeout: 5s",
            "timeout: expected a duration like 90s, 30m or 1h30m (between 10s and 24h), got '5s'",
        ),
        (
            "timeout: 2d",
            "timeout: expected a duration like 90s, 30m or 1h30m (between 10s and 24h), got '2d'",
        ),
        (
            "timeout: 25h",
            "timeout: expected a duration like 90s, 30m or 1h30m (between 10s and 24h), got '25h'",
        ),
        (
            "network: host",
            "network: expected a mapping with the keys mode, presets, allow, got 'host'",
        ),
        ("network: {mode: all}", "network.mode: expected one of none, allowlist, open, got 'all'"),
        (
            "network: {presets: [pypi, cpan]}",
            "network.presets[1]: expected one of debian, pypi, npm, go, crates, rubygems, maven, "
            "github, got 'cpan'",
        ),
        (
            "network: {allow: ['https://api.example.com/v1']}",
            "network.allow[0]: expected a host name like api.example.com or *.example.com "
            "(no scheme, path or port), got 'https://api.example.com/v1'",
        ),
        (
            "network: {mode: open, proxy: x}",
            "network.proxy: unknown key; expected one of: mode, presets, allow",
        ),
        (
            "agent: {preset: gpt}",
            "agent.preset: expected one of claude-code, codex, aider, got 'gpt'",
        ),
        (
            "agent: {command: x, preset: codex}",
            "agent: expected either agent.command or agent.preset, not both",
        ),
        (
            "agent: {command: [a, b]}",
            "agent.command: expected a shell command (a string), got a list",
        ),
        (
            "agent: {secrets: [OK_NAME, 'not-a-name']}",
            "agent.secrets[1]: expected an environment variable name like ANTHROPIC_API_KEY "
            "(not starting with TRIMO_), got 'not-a-name'",
        ),
        (
            "agent: {secrets: [TRIMO_OUT]}",
            "agent.secrets[0]: expected an environment variable name like ANTHROPIC_API_KEY "
            "(not starting with TRIMO_), got 'TRIMO_OUT'",
        ),
        (
            "agent: {secrets: KEY}",
            "agent.secrets: expected a list of environment variable names, got 'KEY'",
        ),
        (
            "agent: {cmd: x}",
            "agent.cmd: unknown key; expected one of: "
            "command, preset, secrets, model, max_turns, budget",
        ),
        ("test: {command: 5}", "test.command: expected a shell command (a string), got 5"),
        (
            "test: {junit: [a]}",
            "test.junit: expected a glob relative to $TRIMO_OUT, like junit.xml or reports/*.xml, "
            "got a list",
        ),
        (
            "image: {dockerfile: ../Dockerfile}",
            "image.dockerfile: expected a path inside .trimo/, like Dockerfile, "
            "got '../Dockerfile'",
        ),
        (
            "image: {dockerfile: /etc/passwd}",
            "image.dockerfile: expected a path inside .trimo/, like Dockerfile, got '/etc/passwd'",
        ),
        (
            "image: {build_timeout: soon}",
            "image.build_timeout: expected a duration like 90s, 30m or 1h30m "
            "(between 10s and 24h), got 'soon'",
        ),
        (
            "image: {build_timeout: 2s}",
            "image.build_timeout: expected a duration like 90s, 30m or 1h30m "
            "(between 10s and 24h), got '2s'",
        ),
        (
            "protected_paths: .github",
            "protected_paths: expected a list of gitignore-style globs, "
            "like .github/**, got '.github'",
        ),
        (
            "protected_paths: ['']",
            "protected_paths[0]: expected a gitignore-style glob (a string), got ''",
        ),
        ("trigger_label: [a]", "trigger_label: expected a label name (a string), got a list"),
        (
            "timeot: 30m",
            "timeot: unknown key; expected one of: image, agent, test, timeout, "
            "resources, network, protected_paths, trigger_label",
        ),
        ("- agent", "(top level): expected a mapping of settings (key: value), got a list"),
    ],
)
def test_each_mistake_gets_a_one_line_message_naming_file_field_and_expectation(
    text: str, message: str
) -> None:
    assert _error(text) == f".trimo/config.yml: {message}"


def test_the_build_timeout_is_the_repositorys_under_the_servers_limit() -> None:
    assert parse_repo_config("").image.build_timeout_within(1800) == 1800
    assert parse_repo_config("image: {build_timeout: 5m}").image.build_timeout_within(1800) == 300
    assert parse_repo_config("image: {build_timeout: 2h}").image.build_timeout_within(1800) == 1800


def test_invalid_yaml_names_the_line() -> None:
    message = _error("agent:\n  command: x\n  secrets: [A\ntest: {}\n")
    assert message.startswith(".trimo/config.yml: line ")
    assert "invalid YAML" in message


def test_loading_from_a_checkout(tmp_path: Path) -> None:
    assert load_repo_config(tmp_path) == parse_repo_config("")
    trimo = tmp_path / ".trimo"
    trimo.mkdir()
    (trimo / "config.yaml").write_text("timeout: 10m\n")
    assert load_repo_config(tmp_path).timeout_seconds == 600
    (trimo / "config.yml").write_text("timeout: 20m\n")
    assert load_repo_config(tmp_path).timeout_seconds == 1200
    (trimo / "config.yml").write_text("network: host\n")
    with pytest.raises(ConfigError, match=r"^\.trimo/config\.yml: network: "):
        load_repo_config(tmp_path)


def test_the_dockerfile_is_found_in_the_trimo_directory(tmp_path: Path) -> None:
    config = parse_repo_config("")
    assert config.dockerfile_path(tmp_path) is None  # the base image
    (tmp_path / ".trimo").mkdir()
    (tmp_path / ".trimo" / "Dockerfile").write_text("FROM trimo/base:bookworm\n")
    assert config.dockerfile_path(tmp_path) == tmp_path / ".trimo" / "Dockerfile"


def test_a_configured_dockerfile_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    (tmp_path / ".trimo").mkdir()
    (tmp_path / ".trimo" / "config.yml").write_text("image: {dockerfile: Dockerfile.dev}\n")
    with pytest.raises(ConfigError) as info:
        load_repo_config(tmp_path)
    assert str(info.value) == (
        ".trimo/config.yml: image.dockerfile: expected a file inside .trimo/, "
        "but 'Dockerfile.dev' does not exist"
    )


@pytest.mark.parametrize(
    ("path", "patterns", "protected"),
    [
        (".github/workflows/ci.yml", [".github/workflows/**"], True),
        (".github/workflows/nested/x.yml", [".github/workflows/**"], True),
        (".github/dependabot.yml", [".github/workflows/**"], False),
        ("src/.github/workflows/ci.yml", [".github/workflows/**"], False),
        (".github/workflows/ci.yml", [".github/workflows"], True),
        (".github/workflows/ci.yml", [".github/workflows/"], True),
        ("deploy/key.pem", ["*.pem"], True),
        ("key.pem", ["*.pem"], True),
        ("key.pem.txt", ["*.pem"], False),
        ("a/b/Makefile", ["**/Makefile"], True),
        ("Makefile", ["/Makefile"], True),
        ("sub/Makefile", ["/Makefile"], False),
        ("secrets/dev.env", ["secrets/", "!secrets/dev.env"], False),
        ("secrets/prod.env", ["secrets/", "!secrets/dev.env"], True),
        ("docs/a.md", ["docs/*.md"], True),
        ("docs/sub/a.md", ["docs/*.md"], False),
        ("v1.txt", ["v[0-9].txt"], True),
        ("src/app.py", [], False),
    ],
)
def test_protected_paths_follow_gitignore_rules(
    path: str, patterns: list[str], protected: bool
) -> None:
    assert is_protected(path, patterns) is protected


def test_the_network_section_and_its_old_form() -> None:
    config = parse_repo_config(
        "network:\n  mode: open\n  presets: [go, github]\n"
        "  allow: ['*.Mirror.example', 'api.example.com.']\n"
    )
    assert config.network.mode == NetworkMode.OPEN
    assert config.network.presets == ["go", "github"]
    assert config.network.allow == ["*.mirror.example", "api.example.com"]
    assert config.network.old_form_note() is None
    # The old `network: bridge|none` still reads, and the run's log says what it became.
    old = parse_repo_config("network: bridge\n").network
    assert old.mode == NetworkMode.OPEN
    assert old.old_form_note() == (
        "network: 'bridge' is the old form of this setting and now means {mode: open}; write "
        "`network: {mode: open}` (or drop it for the allowlist default) in .trimo/config.yml"
    )
    assert parse_repo_config("network: none\n").network.mode == NetworkMode.NONE
    assert _error("network: {old_form: bridge}") == (
        ".trimo/config.yml: network: unknown key; expected one of: mode, presets, allow"
    )
