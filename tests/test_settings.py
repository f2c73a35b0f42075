"""Server settings: environment over file over defaults, secrets kept out of sight."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bot.errors import RunRefused, SettingsError
from bot.secrets import LocalSecrets, MissingSecretError, ServerSecrets
from bot.settings import Settings
from tests.github_fake import app_private_key

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "settings.example.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    import os

    for name in list(os.environ):
        if name.startswith("TRIMO_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    yield


def _ec_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.load()
    assert settings.data_dir == tmp_path / "xdg" / "trimo"
    assert settings.database_url == f"sqlite:///{tmp_path}/xdg/trimo/trimo.db"
    assert (settings.workers, settings.default_timeout, settings.docker_url) == (2, 1800, None)
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.api_url == "https://api.github.com" and settings.web_url == "https://github.com"
    assert (settings.trigger_label, settings.min_permission) == ("trimo", "write")
    monkeypatch.delenv("XDG_DATA_HOME")
    assert Settings.load().data_dir == Path.home() / ".local" / "share" / "trimo"


def test_environment_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "trimo.toml"
    file.write_text(
        'workers = 3\nport = 9000\ndata_dir = "/srv/trimo"\ndefault_timeout = "1h"\n'
        'image_build_timeout = "20m"\ndrain_grace = "2m"\n'
        'api_url = "https://ghe.example.com/api/v3/"\n[secrets]\nAPI_KEY = "from-file"\n'
    )
    monkeypatch.setenv("TRIMO_WORKERS", "5")
    settings = Settings.load(file)
    assert (settings.workers, settings.port) == (5, 9000)
    assert settings.data_dir == Path("/srv/trimo")
    assert settings.database_url == "sqlite:////srv/trimo/trimo.db"
    assert settings.default_timeout == 3600
    assert (settings.image_build_timeout, settings.drain_grace) == (1200, 120)
    assert settings.api_url == "https://ghe.example.com/api/v3"
    assert ServerSecrets(settings).server_value("API_KEY") == "from-file"

    monkeypatch.setenv("TRIMO_SETTINGS_FILE", str(file))
    assert Settings.load().port == 9000


def test_the_example_settings_file_loads() -> None:
    settings = Settings.load(EXAMPLE)
    assert settings.workers >= 1


def test_a_lease_is_renewed_at_least_twice_before_it_lapses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terms = Settings.load().lease_terms()
    assert (terms.length.total_seconds(), terms.renew_every.total_seconds()) == (30.0, 5.0)
    monkeypatch.setenv("TRIMO_LEASE_SECONDS", "4")
    monkeypatch.setenv("TRIMO_LEASE_RENEW_SECONDS", "3")
    with pytest.raises(SettingsError, match="TRIMO_LEASE_RENEW_SECONDS: 3 s is more than half"):
        Settings.load()


def test_webhook_secrets_accept_a_comma_separated_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIMO_WEBHOOK_SECRET", "new-secret, old-secret")
    assert Settings.load().webhook_secret_values() == ["new-secret", "old-secret"]
    monkeypatch.setenv("TRIMO_WEBHOOK_SECRETS", "only-this")
    assert Settings.load().webhook_secret_values() == ["only-this"]


def test_server_secrets_come_only_from_the_server_and_go_where_granted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "C_KEY").write_text("c-from-file\n")
    monkeypatch.setenv(
        "TRIMO_SECRETS",
        '{"A_KEY": {"value": "from-settings", "repos": ["acme/*"]},'
        ' "B_KEY": {"repos": ["acme-labs/api"], "forks": true},'
        ' "C_KEY": {"repos": ["acme/*", "acme-labs/api"]}, "D_KEY": {"repos": ["*"]},'
        ' "E_KEY": "granted-to-nobody"}',
    )
    monkeypatch.setenv("TRIMO_SECRETS_DIR", str(secrets_dir))
    monkeypatch.setenv("TRIMO_SECRET_A_KEY", "from-prefixed")
    monkeypatch.setenv("TRIMO_SECRET_B_KEY", "b-prefixed")
    monkeypatch.setenv("D_KEY", "d-plain-env-of-the-server")
    server = ServerSecrets(Settings.load())
    assert server.resolve(["A_KEY", "C_KEY"], "acme/web", fork=False) == {
        "A_KEY": "from-settings",
        "C_KEY": "c-from-file",
    }
    assert server.resolve(["B_KEY"], "acme-labs/api", fork=True) == {"B_KEY": "b-prefixed"}
    # A plain environment variable of the server is never a secret's value.
    with pytest.raises(MissingSecretError, match="TRIMO_SECRET_D_KEY"):
        server.resolve(["D_KEY"], "acme/web", fork=False)
    for names, repo, fork, named in [
        (["A_KEY"], "acme-labs/api", False, r"\[secrets.A_KEY\]"),
        (["B_KEY"], "acme/web", False, r"\[secrets.B_KEY\]"),
        (["E_KEY"], "acme/web", False, r"\[secrets.E_KEY\]"),
        (["NOT_DECLARED"], "acme/web", False, r"\[secrets.NOT_DECLARED\]"),
        (["A_KEY"], "acme/web", True, r"forks = true"),
    ]:
        with pytest.raises(RunRefused, match=named) as refused:
            server.resolve(names, repo, fork=fork)
        assert "from-settings" not in str(refused.value)

    # `trimo run` on the user's own machine: no grants, and the user's environment counts.
    local = LocalSecrets(Settings.load())
    assert local.resolve(["D_KEY", "E_KEY"], "/home/me/repo", fork=False) == {
        "D_KEY": "d-plain-env-of-the-server",
        "E_KEY": "granted-to-nobody",
    }


@pytest.mark.parametrize(
    ("variable", "value"),
    [("TRIMO_SECRET_PIN_CODE", "4711"), ("TRIMO_SECRETS", '{"PIN_CODE": "4711"}')],
)
def test_a_secret_too_short_to_scan_for_is_refused_at_load(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        Settings.load()
    message = str(caught.value)
    assert "secret PIN_CODE is 4 characters long; Trimo needs at least 8" in message
    assert "would match ordinary text" in message and "4711" not in message


def test_secrets_never_appear_in_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    pem = app_private_key()
    monkeypatch.setenv("TRIMO_PRIVATE_KEY", pem)
    monkeypatch.setenv("TRIMO_WEBHOOK_SECRET", "whsec-visible-if-leaked")
    monkeypatch.setenv("TRIMO_SECRETS", '{"K": "value-visible-if-leaked"}')
    monkeypatch.setenv("TRIMO_DATABASE_URL", "postgresql://trimo:db-password-leak@db/trimo")
    settings = Settings.load()
    for text in (repr(settings), str(settings)):
        assert "visible-if-leaked" not in text
        assert "db-password-leak" not in text
        assert "PRIVATE KEY" not in text
    assert settings.private_key_pem() == pem


def test_require_github_names_each_missing_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SettingsError, match=r"^TRIMO_APP_ID is not set: set it to your GitHub"):
        Settings.load().require_github()
    monkeypatch.setenv("TRIMO_APP_ID", "1234")
    with pytest.raises(SettingsError, match=r"^TRIMO_PRIVATE_KEY_PATH \(or TRIMO_PRIVATE_KEY\)"):
        Settings.load().require_github()
    key = tmp_path / "app.pem"
    key.write_text(app_private_key())
    monkeypatch.setenv("TRIMO_PRIVATE_KEY_PATH", str(key))
    Settings.load().require_github(webhooks=False)
    with pytest.raises(SettingsError, match=r"^TRIMO_WEBHOOK_SECRET is not set"):
        Settings.load().require_github()
    monkeypatch.setenv("TRIMO_WEBHOOK_SECRET", "s3cret")
    Settings.load().require_github()


@pytest.mark.parametrize(
    ("value", "problem"),
    [("not a key at all", "it does not parse"), ("EC", "not an RSA key")],
)
def test_a_wrong_private_key_is_refused_at_load_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    pem = _ec_pem() if value == "EC" else value
    monkeypatch.setenv("TRIMO_PRIVATE_KEY", pem)
    with pytest.raises(SettingsError) as info:
        Settings.load()
    message = str(info.value)
    assert message.startswith("TRIMO_PRIVATE_KEY does not hold a PEM RSA private key")
    assert problem in message
    assert pem not in message and "BEGIN" not in message


def test_an_escaped_newline_key_from_the_environment_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRIMO_PRIVATE_KEY", app_private_key().replace("\n", "\\n"))
    assert (Settings.load().private_key_pem() or "").startswith("-----BEGIN PRIVATE KEY-----\n")


def test_an_unreadable_key_path_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIMO_PRIVATE_KEY_PATH", str(tmp_path / "missing.pem"))
    with pytest.raises(SettingsError, match=r"missing\.pem, which cannot be read"):
        Settings.load()


def test_wrong_values_name_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIMO_WORKERS", "many")
    with pytest.raises(SettingsError, match=r"^TRIMO_WORKERS: .*integer"):
        Settings.load()
    monkeypatch.delenv("TRIMO_WORKERS")
    monkeypatch.setenv("TRIMO_MIN_PERMISSION", "owner")
    with pytest.raises(SettingsError, match=r"^TRIMO_MIN_PERMISSION: .*'write'"):
        Settings.load()
    monkeypatch.delenv("TRIMO_MIN_PERMISSION")
    file = tmp_path / "t.toml"
    file.write_text("wokers = 2\n")
    with pytest.raises(SettingsError, match=r"^wokers in .*t\.toml: unknown setting"):
        Settings.load(file)
    file.write_text("workers = \n")
    with pytest.raises(SettingsError, match=r"t\.toml is not valid TOML"):
        Settings.load(file)
    with pytest.raises(SettingsError, match=r"absent\.toml does not exist"):
        Settings.load(tmp_path / "absent.toml")


def test_min_permission_decides_who_may_trigger(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.load()
    assert [settings.allows(p) for p in ("read", "triage", "write", "maintain", "admin")] == [
        False,
        False,
        True,
        True,
        True,
    ]
    assert not settings.allows(None) and not settings.allows("none")
    monkeypatch.setenv("TRIMO_MIN_PERMISSION", "admin")
    assert not Settings.load().allows("maintain")
