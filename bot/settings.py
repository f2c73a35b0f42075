"""Server settings: `TRIMO_*` environment variables over an optional TOML file over defaults."""

from __future__ import annotations

import json
import os
import tomllib
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from bot.cacerts import read_certificates
from bot.errors import SettingsError
from bot.gateway.policy import ModelPolicy
from bot.leases import LeaseTerms
from bot.network import HOST_EXPECTED, NetworkLimits, NetworkMode, valid_host_pattern
from bot.repoconfig import DEFAULT_IMAGE_BUILD_TIMEOUT, DEFAULT_TIMEOUT_SECONDS, parse_duration
from bot.secretscan import check_secret_value

ENV_PREFIX = "TRIMO_"
SETTINGS_FILE_ENV = "TRIMO_SETTINGS_FILE"
WEBHOOK_SECRET_ENV = "TRIMO_WEBHOOK_SECRET"
SECRET_ENV_PREFIX = "TRIMO_SECRET_"
DEFAULT_DRAIN_GRACE = 60
# The App's credentials as the manifest flow wrote them, in the data directory (mode 0600).
APP_FILE = "github-app.toml"
# GitHub's repository roles, weakest first.
PERMISSION_LEVELS = ("read", "triage", "write", "maintain", "admin")
Permission = Literal["read", "triage", "write", "maintain", "admin"]

APP_ID_MISSING = (
    "TRIMO_APP_ID is not set: set it to your GitHub App's numeric id "
    "(Settings → Developer settings → GitHub Apps → your app → App ID)"
)
PRIVATE_KEY_MISSING = (
    "TRIMO_PRIVATE_KEY_PATH (or TRIMO_PRIVATE_KEY) is not set: generate a private key on your "
    "GitHub App's page (Private keys → Generate a private key) and point "
    "TRIMO_PRIVATE_KEY_PATH at the downloaded .pem file"
)
PRIVATE_KEY_BAD = (
    "{setting} does not hold a PEM RSA private key ({problem}): use the .pem file GitHub "
    "gave you under your App's Private keys, unchanged"
)
PRIVATE_KEY_UNREADABLE = (
    "TRIMO_PRIVATE_KEY_PATH points at {path}, which cannot be read ({problem}): "
    "check the path and the file's permissions"
)
PRIVATE_KEY_BOTH = "TRIMO_PRIVATE_KEY and TRIMO_PRIVATE_KEY_PATH are both set: keep only one"
NO_WEBHOOK_SIGNING_KEY = (
    "TRIMO_WEBHOOK_SECRET is not set: set it to the webhook secret entered on your GitHub App's "
    "page (comma-separate several while rotating)"
)
SETTINGS_FILE_MISSING = "settings file {path} does not exist: check {source}"
SETTINGS_FILE_BAD = "settings file {path} is not valid TOML: {problem}"
SETTING_BAD = "{setting}: {problem}"

# Public list prices, US dollars per million tokens (input, output); a server sets its own.
DEFAULT_MODEL_PRICES: dict[str, tuple[float, float]] = {
    "claude-opus-4": (15.0, 75.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-haiku-4": (1.0, 5.0),
    "gpt-5": (1.25, 10.0),
    "gpt-4.1": (2.0, 8.0),
}

_file_data: ContextVar[dict[str, Any] | None] = ContextVar("trimo_settings_file", default=None)


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "trimo"


def _split_secrets(value: object) -> object:
    # Environment variables carry several secrets as one comma-separated string.
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class SecretSetting(BaseModel):
    """One secret of the server: who may have it and, optionally, its value.

    `repos` are fnmatch-style patterns of "owner/name" (``acme/*``); none means no repository.
    Without `value` here, the value is TRIMO_SECRET_<NAME> or the file <secrets_dir>/<NAME>.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: SecretStr | None = None
    repos: list[str] = Field(default_factory=list)
    forks: bool = False  # whether runs of pull requests from forks may have it

    @model_validator(mode="before")
    @classmethod
    def _plain_value(cls, data: object) -> object:
        # `NAME = "value"` in [secrets] is a value granted to no repository yet.
        if isinstance(data, str | SecretStr):
            return {"value": data}
        return data


class _WebhookSecretEnv(PydanticBaseSettingsSource):
    """Reads the singular TRIMO_WEBHOOK_SECRET, the spelling GitHub's docs make people expect."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        value = os.environ.get(WEBHOOK_SECRET_ENV)
        return {"webhook_secrets": value} if value else {}


class Settings(BaseSettings):
    """Everything `trimo serve`/`trimo worker` need; secrets are SecretStr and never printed."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    data_dir: Path = Field(default_factory=_default_data_dir)
    # Empty: a SQLite file in data_dir. Hidden from repr: a PostgreSQL URL may hold a password.
    database_url: str = Field("", repr=False)
    docker_url: str | None = None  # None: DOCKER_HOST or the local socket
    workers: int = Field(2, ge=1, le=64)
    # A worker holds each run it executes under a lease it renews every `lease_renew_seconds`
    # (bot/leases.py); a run whose lease lapsed `lease_seconds` ago is judged dead.
    lease_seconds: float = Field(30.0, gt=0)
    lease_renew_seconds: float = Field(5.0, gt=0)
    default_timeout: int = DEFAULT_TIMEOUT_SECONDS
    # The longest a repository's image build may take (its image.build_timeout may ask less).
    image_build_timeout: int = DEFAULT_IMAGE_BUILD_TIMEOUT
    # On SIGTERM a worker claims nothing new and gives its live runs this long to finish; then
    # it checkpoints them and puts them back in the queue, for another worker to resume.
    drain_grace: int = DEFAULT_DRAIN_GRACE
    secrets: dict[str, SecretSetting] = Field(default_factory=dict)
    # A directory with one file per secret, named like the secret (Docker and Kubernetes secrets).
    secrets_dir: Path | None = None
    # A PEM file of CA certificates added to trimo/base (and so to every image): for networks
    # whose proxy presents its own CA to package registries.
    extra_ca_certs: Path | None = None

    # The network policy every repository's runs live under (see bot/network.py): hosts added to
    # every allowlist, hosts refused whatever a repository asks, the widest mode a repository
    # may ask for, and named internal hosts that may resolve to private addresses.
    network_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    network_deny: Annotated[list[str], NoDecode] = Field(default_factory=list)
    network_max_mode: NetworkMode = NetworkMode.OPEN
    network_internal_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    app_id: int | None = None
    private_key: SecretStr | None = None
    private_key_path: Path | None = None
    webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_url: str = "https://api.github.com"
    web_url: str = "https://github.com"
    # Where repositories are cloned from and pushed to; `{repo}` is "owner/name".
    # Default: "<web_url>/{repo}.git".
    git_url: str | None = None
    trigger_label: str = "trimo"
    min_permission: Permission = "write"
    bot_login: str | None = None
    # The App's OAuth credentials (its page: Client ID, Client secrets): people sign in to the
    # run pages with GitHub.
    client_id: str | None = None
    client_secret: SecretStr | None = None

    # Reports to GitHub wait in the outbox when GitHub does not take them: the first retry
    # after this many seconds (unless GitHub says how long), doubling up to the maximum.
    report_backoff_seconds: float = Field(2.0, gt=0)
    report_max_backoff_seconds: float = Field(900.0, gt=0)
    # A webhook delivery whose processing fails is tried again this many times in all, the first
    # retry after `delivery_backoff_seconds`, doubling; then it is marked failed with its reason
    # (`trimo deliveries retry ID` tries it again). One being processed is held under a lease of
    # `delivery_lease_seconds`, renewed while it is processed: another worker takes it only
    # once the lease has expired.
    delivery_attempts: int = Field(5, ge=1, le=100)
    delivery_backoff_seconds: float = Field(5.0, gt=0)
    delivery_lease_seconds: float = Field(60.0, ge=1)

    # Where people reach this Trimo's run pages (e.g. https://trimo.example.com): check runs
    # and tracking comments link there. Unset: the reports name `trimo runs logs` instead.
    public_url: str | None = None
    # Bearer token a Prometheus elsewhere sends to /metrics; unset: only this machine scrapes.
    metrics_token: SecretStr | None = None

    # The model gateway: where each provider's calls go (any compatible endpoint), the price of
    # each model in US dollars per million tokens [input, output] (the longest matching name
    # prefix wins), and the most one installation's runs may spend on models per UTC day.
    anthropic_url: str = "https://api.anthropic.com"
    openai_url: str = "https://api.openai.com/v1"
    model_prices: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: dict(DEFAULT_MODEL_PRICES)
    )
    daily_model_usd: float | None = Field(None, gt=0)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    @field_validator("lease_renew_seconds")
    @classmethod
    def _renewed_twice_per_lease(cls, value: float, info: ValidationInfo) -> float:
        lease = info.data.get("lease_seconds")
        if isinstance(lease, float) and value * 2 > lease:
            raise ValueError(
                f"{value:g} s is more than half of lease_seconds ({lease:g} s): one late "
                "renewal would let a live run's lease lapse"
            )
        return value

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_secrets(value)

    @field_validator("default_timeout", "image_build_timeout", "drain_grace", mode="before")
    @classmethod
    def _duration(cls, value: object) -> int:
        try:
            return parse_duration(value)
        except ValueError:
            raise ValueError("expected a duration like 90s, 30m or 1h30m") from None

    @field_validator("network_allow", "network_deny", "network_internal_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: object) -> object:
        hosts = _split_secrets(value)
        if isinstance(hosts, list):
            for host in hosts:
                if not isinstance(host, str) or not valid_host_pattern(host.lower()):
                    raise ValueError(f"expected {HOST_EXPECTED}, got {host!r}")
            return [h.lower() for h in hosts]
        return hosts

    @field_validator("extra_ca_certs")
    @classmethod
    def _pem_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_certificates(value)  # a wrong file fails at start, not at the next image build
        return value

    @field_validator("api_url", "web_url", "public_url", "anthropic_url", "openai_url")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        data_dir = self.data_dir.expanduser()
        object.__setattr__(self, "data_dir", data_dir)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{data_dir}/trimo.db")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            _WebhookSecretEnv(settings_cls),
            InitSettingsSource(settings_cls, init_kwargs=_file_data.get() or {}),
        )

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> Settings:
        """Settings from the environment over `path` (else $TRIMO_SETTINGS_FILE) over defaults.

        Raises SettingsError naming the setting and the fix; the private key is checked here.
        """
        source = "the --settings option"
        if path is None and os.environ.get(SETTINGS_FILE_ENV):
            path, source = Path(os.environ[SETTINGS_FILE_ENV]), SETTINGS_FILE_ENV
        data = _read_toml(path, source) if path is not None else {}
        settings = cls._build(data, overrides, path)
        app_file = settings.data_dir / APP_FILE
        if settings.app_id is None and app_file.is_file():
            # The App created from the run pages (the manifest flow); anything set elsewhere wins.
            settings = cls._build(
                _read_toml(app_file, "the data directory") | data, overrides, path
            )
        settings.private_key_pem()  # fail at start, not at the first webhook
        for name, value in settings.configured_secrets().items():
            check_secret_value(name, value)
        return settings

    @classmethod
    def _build(cls, data: dict[str, Any], overrides: dict[str, Any], path: Path | None) -> Settings:
        token = _file_data.set(data)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise _settings_error(exc, path) from None
        finally:
            _file_data.reset(token)

    @property
    def has_app(self) -> bool:
        """Whether any GitHub App setting is given (else `trimo serve` offers to create one)."""
        return (
            self.app_id is not None
            or self.private_key is not None
            or self.private_key_path is not None
            or bool(self.webhook_secrets)
        )

    def network_limits(self) -> NetworkLimits:
        return NetworkLimits(
            allow=tuple(self.network_allow),
            deny=tuple(self.network_deny),
            internal_hosts=tuple(self.network_internal_hosts),
            max_mode=self.network_max_mode,
        )

    @property
    def database_is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def configured_secrets(self) -> dict[str, str]:
        """The secret values set in the settings and in TRIMO_SECRET_* variables, by name."""
        found = {
            key.removeprefix(SECRET_ENV_PREFIX): value
            for key, value in os.environ.items()
            if key.startswith(SECRET_ENV_PREFIX) and value
        }
        found.update(
            {
                name: setting.value.get_secret_value()
                for name, setting in self.secrets.items()
                if setting.value is not None
            }
        )
        return found

    def lease_terms(self) -> LeaseTerms:
        return LeaseTerms(
            length=timedelta(seconds=self.lease_seconds),
            renew_every=timedelta(seconds=self.lease_renew_seconds),
        )

    def model_policy(self) -> ModelPolicy:
        """What the model gateway of each run is told: providers, prices, the daily cap."""
        return ModelPolicy(
            anthropic_url=self.anthropic_url,
            openai_url=self.openai_url,
            prices=dict(self.model_prices),
            daily_usd=self.daily_model_usd,
        )

    def repo_git_url(self, repo: str) -> str:
        """The git URL of GitHub repository `repo` ("owner/name")."""
        template = self.git_url or f"{self.web_url}/{{repo}}.git"
        return template.replace("{repo}", repo)

    def run_url(self, run_id: int) -> str | None:
        """The run page of run `run_id`, when `public_url` is set."""
        return f"{self.public_url}/runs/{run_id}" if self.public_url else None

    def webhook_secret_values(self) -> list[str]:
        return [s.get_secret_value() for s in self.webhook_secrets]

    def private_key_pem(self) -> str | None:
        """The App's private key text, validated as PEM RSA; None when neither setting is set."""
        if self.private_key is not None and self.private_key_path is not None:
            raise SettingsError(PRIVATE_KEY_BOTH)
        if self.private_key is not None:
            # Environment variables often carry the newlines escaped.
            pem = self.private_key.get_secret_value().replace("\\n", "\n")
            setting = "TRIMO_PRIVATE_KEY"
        elif self.private_key_path is not None:
            path = self.private_key_path.expanduser()
            try:
                pem = path.read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as exc:
                problem = getattr(exc, "strerror", None) or type(exc).__name__
                raise SettingsError(
                    PRIVATE_KEY_UNREADABLE.format(path=path, problem=problem)
                ) from None
            setting = f"TRIMO_PRIVATE_KEY_PATH ({path})"
        else:
            return None
        _check_rsa_pem(pem, setting)
        return pem

    def require_github(self, *, webhooks: bool = True) -> None:
        """Raise SettingsError naming the first GitHub setting that is missing or wrong."""
        if self.app_id is None:
            raise SettingsError(APP_ID_MISSING)
        if self.private_key_pem() is None:
            raise SettingsError(PRIVATE_KEY_MISSING)
        if webhooks and not self.webhook_secrets:
            raise SettingsError(NO_WEBHOOK_SIGNING_KEY)

    def allows(self, permission: str | None) -> bool:
        """Whether a sender with this repository permission may trigger runs."""
        if permission not in PERMISSION_LEVELS:
            return False
        return PERMISSION_LEVELS.index(permission) >= PERMISSION_LEVELS.index(self.min_permission)


def _check_rsa_pem(pem: str, setting: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem.strip().encode("ascii", "replace"), password=None)
    except (ValueError, TypeError) as exc:
        # The library's own message never contains key material, but keep it generic anyway.
        problem = "it is encrypted" if "encrypted" in str(exc).lower() else "it does not parse"
        raise SettingsError(PRIVATE_KEY_BAD.format(setting=setting, problem=problem)) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SettingsError(PRIVATE_KEY_BAD.format(setting=setting, problem="not an RSA key"))


def _read_toml(path: Path, source: str) -> dict[str, Any]:
    path = path.expanduser()
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(SETTINGS_FILE_MISSING.format(path=path, source=source)) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(SETTINGS_FILE_BAD.format(path=path, problem=exc)) from None


def _settings_error(exc: ValidationError, path: Path | None) -> SettingsError:
    # include_input=False: the failing value may be a secret.
    error = exc.errors(include_url=False, include_input=False)[0]
    name = ".".join(str(p) for p in error["loc"])
    top = str(error["loc"][0]) if error["loc"] else name
    where = f"{ENV_PREFIX}{top.upper()}"
    if path is not None:
        where += f" (or {name} in {path})"
    problem = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        where, problem = f"{name} in {path}", "unknown setting; check its spelling"
    return SettingsError(SETTING_BAD.format(setting=where, problem=problem))


def write_app_file(data_dir: Path, values: dict[str, Any]) -> Path:
    """Write the App's settings (`values`: strings, ints, lists of strings) to the data
    directory's APP_FILE, readable by this user alone; the next `Settings.load` uses them."""
    lines = ["# Written by trimo serve when the GitHub App was created; keep it secret."]
    for key, value in values.items():
        # JSON's string escapes are TOML's basic-string escapes.
        lines.append(f"{key} = {json.dumps(value)}")
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / APP_FILE
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
