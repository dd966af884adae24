"""Settings.from_env: defaults, parsing, and the errors that stop a process from starting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from notifier.config import DEFAULT_RETRY_INTERVALS, Settings
from notifier.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

SETTING_NAMES = (
    "DATABASE_URL",
    "REDIS_URL",
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_USERNAME",
    "SMTP_PASSWORD",
    "SMTP_SECURITY",
    "SMTP_TIMEOUT",
    "MAIL_FROM",
    "RETRY_INTERVALS",
    "PORT",
    "MAX_BODY_BYTES",
    "PAGE_SIZE_MAX",
    "JOB_TIMEOUT",
    "TEMPLATES_DIR",
    "BRAND_NAME",
    "LOG_LEVEL",
)


def config_error(env: dict[str, str]) -> ConfigError:
    """The ConfigError that from_env raises for env (fails the test when none is raised)."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    return caught.value


def test_empty_environment_gives_the_defaults():
    settings = Settings.from_env({})

    assert settings == Settings()
    assert settings.database_url == "sqlite:///var/notifier.db"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.smtp_host == "127.0.0.1"
    assert settings.smtp_port == 1025
    assert settings.smtp_username == ""
    assert settings.smtp_password == ""
    assert settings.smtp_security == "none"
    assert settings.mail_from == "notifier@localhost"
    assert settings.retry_intervals == DEFAULT_RETRY_INTERVALS
    assert settings.port == 5000


def test_every_setting_is_read_from_the_environment():
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://notifier:secret@db:5432/notifier",
            "REDIS_URL": "redis://redis:6379/3",
            "SMTP_HOST": "smtp.example.com",
            "SMTP_PORT": "587",
            "SMTP_USERNAME": "mailer",
            "SMTP_PASSWORD": "hunter2",
            "SMTP_SECURITY": "starttls",
            "MAIL_FROM": "no-reply@example.com",
            "RETRY_INTERVALS": "5,10,20",
            "PORT": "8080",
        }
    )

    assert settings.database_url == "postgresql://notifier:secret@db:5432/notifier"
    assert settings.redis_url == "redis://redis:6379/3"
    assert settings.smtp_host == "smtp.example.com"
    assert settings.smtp_port == 587
    assert settings.smtp_username == "mailer"
    assert settings.smtp_password == "hunter2"
    assert settings.smtp_security == "starttls"
    assert settings.mail_from == "no-reply@example.com"
    assert settings.retry_intervals == (5, 10, 20)
    assert settings.port == 8080


def test_smtp_password_is_kept_out_of_repr():
    settings = Settings.from_env({"SMTP_USERNAME": "mailer", "SMTP_PASSWORD": "hunter2"})

    assert "hunter2" not in repr(settings)


@pytest.mark.parametrize("env", [
    # A quote left open in an env file or a compose entry runs the next settings into this one's value.
    {"RATE_LIMIT": '100/second"\nSMTP_PASSWORD=hunter2'},
    {"SMTP_TIMEOUT": "30 SMTP_PASSWORD=hunter2"},
    {"MAIL_FROM": "a@example.com, b@example.com\nexport SECRET_KEY=hunter2"},
    {"TEMPLATE_CATEGORIES": "invoice=billing SECRET_KEY=hunter2"},
    {"RETRY_INTERVALS": "10,30,x" + "y" * 200 + "hunter2"},
])
def test_a_value_refused_is_quoted_without_the_settings_run_into_it(env):
    message = str(config_error(env))

    assert "hunter2" not in message and "not shown" in message


def test_a_value_refused_is_quoted_whole_when_nothing_runs_into_it():
    assert "got 'invoice=billing'" in str(config_error({"TEMPLATE_CATEGORIES": "invoice=billing"}))
    assert "got '100 a second'" in str(config_error({"RATE_LIMIT": "100 a second"}))


@pytest.mark.parametrize("raw", ["SSL", " ssl "])
def test_smtp_security_is_case_and_space_insensitive(raw):
    assert Settings.from_env({"SMTP_SECURITY": raw}).smtp_security == "ssl"


def test_blank_numbers_and_host_fall_back_to_defaults():
    settings = Settings.from_env({"SMTP_PORT": "", "PORT": "  ", "SMTP_HOST": "   "})

    assert settings.smtp_port == 1025
    assert settings.port == 5000
    assert settings.smtp_host == "127.0.0.1"


def test_sqlite_database_url_is_accepted():
    assert Settings.from_env({"DATABASE_URL": "sqlite:////tmp/n.db"}).database_url == "sqlite:////tmp/n.db"


def test_retry_intervals_allow_spaces_after_commas():
    assert Settings.from_env({"RETRY_INTERVALS": "1, 2, 3"}).retry_intervals == (1, 2, 3)


def test_empty_retry_intervals_mean_a_single_attempt():
    settings = Settings.from_env({"RETRY_INTERVALS": ""})

    assert settings.retry_intervals == ()
    assert settings.max_attempts == 1


@pytest.mark.parametrize(("intervals", "attempts"), [((), 1), ((0,), 2), ((0, 0, 0), 4), (DEFAULT_RETRY_INTERVALS, 6)])
def test_max_attempts_is_one_more_than_the_number_of_retry_intervals(intervals, attempts):
    assert Settings(retry_intervals=intervals).max_attempts == attempts


@pytest.mark.parametrize("raw", ["abc", "0", "65536", "-25", "25.5"])
def test_bad_smtp_port_names_smtp_port(raw):
    assert config_error({"SMTP_PORT": raw}).setting == "SMTP_PORT"


@pytest.mark.parametrize("raw", ["http", "0", "70000"])
def test_bad_port_names_port(raw):
    assert config_error({"PORT": raw}).setting == "PORT"


@pytest.mark.parametrize("name", ["SMTP_TIMEOUT", "CALLBACK_TIMEOUT"])
@pytest.mark.parametrize("raw", ["abc", "0", "-5", "nan", "inf", "-inf", "1e400", "3601"])
def test_bad_timeouts_name_their_setting(name, raw):
    # float() takes "nan", "inf" and "1e400": as socket timeouts they failed every send (or every
    # callback) instead of stopping the process at start.
    assert config_error({name: raw}).setting == name


@pytest.mark.parametrize("name", ["SMTP_TIMEOUT", "CALLBACK_TIMEOUT"])
def test_timeouts_take_fractions_of_a_second(name):
    assert getattr(Settings.from_env({name: "2.5"}), name.lower()) == 2.5


@pytest.mark.parametrize("raw", ["tls", "yes", "ssl3"])
def test_unknown_smtp_security_mode_names_smtp_security(raw):
    error = config_error({"SMTP_SECURITY": raw})

    assert error.setting == "SMTP_SECURITY"
    assert "starttls" in str(error)


@pytest.mark.parametrize("raw", ["a,b", "-1", "60,-5", "60,,300", "1.5", "60;300"])
def test_bad_retry_intervals_name_retry_intervals(raw):
    assert config_error({"RETRY_INTERVALS": raw}).setting == "RETRY_INTERVALS"


def test_username_without_password_names_smtp_password():
    assert config_error({"SMTP_USERNAME": "mailer"}).setting == "SMTP_PASSWORD"


@pytest.mark.parametrize("raw", ["mysql://u:p@db/notifier", "notifier.db", "http://db/notifier"])
def test_bad_database_url_scheme_names_database_url(raw):
    assert config_error({"DATABASE_URL": raw}).setting == "DATABASE_URL"


@pytest.mark.parametrize("raw", ["http://redis:6379/0", "localhost:6379"])
def test_bad_redis_url_scheme_names_redis_url(raw):
    assert config_error({"REDIS_URL": raw}).setting == "REDIS_URL"


@pytest.mark.parametrize(("name", "password"), [("DATABASE_URL", "ZQ/pass"), ("REDIS_URL", "ZQ/pass"),
                                              ("REDIS_URL", "ZQ#pass"), ("REDIS_URL", "ZQ?pass")])
def test_a_url_whose_password_breaks_its_port_is_refused_without_quoting_it(name, password):
    # Unescaped, "/", "#" or "?" end the host part early and the password's start is read as the
    # port: the database or Redis client then raised a ValueError quoting it, at start, in the log.
    scheme = "postgresql" if name == "DATABASE_URL" else "redis"
    error = config_error({name: f"{scheme}://notifier:{password}@db:5432/0"})
    assert error.setting == name
    assert "ZQ" not in str(error) and "percent-encode" in str(error)


@pytest.mark.parametrize(
    "raw",
    [
        "not-an-email",
        "",
        "notifier@example.com\r\nBcc: victim@example.com",
        "notifier@example.com\nX-Evil: 1",
        "notifier@",
        "@example.com",
        "no-reply@bücher.example",  # every email would fail: SMTP without SMTPUTF8 cannot carry it
        "Bücher <jösé@example.com>",
        "a@example.com, b@example.com",  # kept the first and dropped the second without a word
        "Acme <a@example.com>, Other <b@example.com>",
    ],
)
def test_bad_mail_from_names_mail_from(raw):
    assert config_error({"MAIL_FROM": raw}).setting == "MAIL_FROM"


@pytest.mark.parametrize("raw", ["not-an-email", "help@example.com\r\nBcc: victim@example.com",
                                 "a@x.example, b@x.example", "Hilfe <hilfe@bücher.example>"])
def test_bad_reply_to_names_reply_to(raw):
    assert config_error({"REPLY_TO": raw}).setting == "REPLY_TO"


def test_reply_to_is_unset_unless_given():
    assert Settings.from_env({}).reply_to == Settings.from_env({"REPLY_TO": "  "}).reply_to == ""
    assert Settings.from_env({"REPLY_TO": "Hilfe <help@example.com>"}).reply_to == "Hilfe <help@example.com>"


def test_mail_from_may_have_a_display_name_beyond_ascii_and_an_international_domain_as_xn():
    raw = '"Bücher, Ltd" <no-reply@xn--bcher-kva.example>'
    assert Settings.from_env({"MAIL_FROM": raw}).mail_from == raw


@pytest.mark.parametrize("raw", ["https://bücher.example", "https://example.com/ab melden", "https://example.com/<x>",
                                 "https://example.com/\tx"])
def test_public_base_url_beyond_ascii_or_with_spaces_is_refused(raw):
    # Unsubscribe links start with it, and List-Unsubscribe carries a URL as it is (RFC 2369).
    assert config_error({"PUBLIC_BASE_URL": raw}).setting == "PUBLIC_BASE_URL"


@pytest.mark.parametrize("raw", ["https://x.example/?a=1", "https://x.example/#f", "https://x.example?",
                                 "https://x.example:99999", "https://x.example:0", "https://x.example:http"])
def test_public_base_url_that_a_path_cannot_follow_is_refused(raw):
    # Links append /unsubscribe/<token>: after a query or fragment it was no path, past 65535 no port.
    assert config_error({"PUBLIC_BASE_URL": raw}).setting == "PUBLIC_BASE_URL"


def test_templates_dir_must_hold_an_email_folder(tmp_path):
    # Wrong, every template send was a 422 naming no known template.
    (tmp_path / "email").mkdir()
    assert Settings.from_env({"TEMPLATES_DIR": str(tmp_path)}).templates_dir == str(tmp_path)
    assert "not email/ itself" in str(config_error({"TEMPLATES_DIR": str(tmp_path / "email")}))
    assert config_error({"TEMPLATES_DIR": str(tmp_path / "missing")}).setting == "TEMPLATES_DIR"


@pytest.mark.parametrize("name", ["mail.example.com", "relay-1", "[192.0.2.1]", "[IPv6:2001:db8::1]"])
def test_smtp_helo_name_takes_a_host_name_or_an_address_literal(name):
    assert Settings.from_env({"SMTP_HELO_NAME": f" {name} "}).smtp_helo_name == name


@pytest.mark.parametrize("name", ["mail.example.com\r\nRSET", "two words", "-leading.example", "a" * 254,
                                  "[not an ip]"])
def test_smtp_helo_name_that_could_break_the_ehlo_line_is_refused_at_start(name):
    assert config_error({"SMTP_HELO_NAME": name}).setting == "SMTP_HELO_NAME"


def test_smtp_ca_file_must_be_a_file_of_certificates(tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate")
    for path in (tmp_path / "missing.pem", tmp_path / "junk.pem"):
        assert config_error({"SMTP_CA_FILE": str(path)}).setting == "SMTP_CA_FILE"
    assert Settings.from_env({}).smtp_ca_file == ""


def test_public_base_url_with_a_password_is_refused_without_quoting_it():
    error = config_error({"PUBLIC_BASE_URL": "https://ops:s3cret@x.example"})
    assert error.setting == "PUBLIC_BASE_URL" and "s3cret" not in str(error)


def test_public_base_url_with_an_international_domain_in_xn_form_is_taken():
    assert Settings.from_env({"PUBLIC_BASE_URL": "https://xn--bcher-kva.example/ab%20melden/"}).public_base_url == (
        "https://xn--bcher-kva.example/ab%20melden")


def test_config_error_message_starts_with_the_setting_name():
    error = config_error({"SMTP_PORT": "abc"})

    assert str(error).startswith("SMTP_PORT ")
    assert "abc" in str(error)


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any notifier setting, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    return env | settings


@pytest.mark.parametrize("script", ["worker.py", "app.py"])
def test_entry_point_with_invalid_setting_exits_2_naming_it(script):
    result = subprocess.run(
        [sys.executable, script],
        cwd=PROJECT_ROOT,
        env=clean_env(SMTP_PORT="abc"),
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert result.returncode == 2
    assert "SMTP_PORT" in result.stderr


@pytest.mark.parametrize(
    ("name", "default", "accepted", "refused"),
    [
        ("BATCH_JOB_SIZE", 25, 1, ("0", "1001", "many")),
        ("DIGEST_MAX_ITEMS", 100, 1, ("0", "1001", "all")),
        ("FINISHED_JOB_TTL", 60, 0, ("-1", "604801", "an hour")),
        ("DEAD_LETTER_TTL_DAYS", 30, 365, ("0", "3651", "a year")),
        ("DATABASE_POOL_SIZE", 16, 0, ("-1", "1001", "lots")),
    ],
)
def test_bounded_numbers_are_read_and_refused_outside_their_bounds(name, default, accepted, refused):
    field = name.lower()
    assert getattr(Settings.from_env({}), field) == default
    assert getattr(Settings.from_env({name: str(accepted)}), field) == accepted
    for raw in refused:
        assert name in str(config_error({name: raw}))


def test_the_compose_env_example_is_valid_settings():
    # docker-compose.yml reads .env.example as an env_file: "NAME=value" lines, everything after "=" literal.
    lines = (PROJECT_ROOT / ".env.example").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    settings = Settings.from_env(env)
    assert settings.operator_auth_limit == "10/minute" and settings.proxy_hops == 0
    assert settings.smtp_host == "mailpit"


def test_compose_takes_the_mail_server_from_the_shell_and_otherwise_what_env_example_says():
    # The SMTP login could only be given by editing the committed .env.example: the .env its header
    # told people to copy it to fills in docker-compose.yml's ${...}, and nothing read them.
    import re

    lines = (PROJECT_ROOT / ".env.example").read_text().splitlines()
    example = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    compose = (PROJECT_ROOT / "docker-compose.yml").read_text()
    taken = {name: default for name, shell, default in
             re.findall(r"^ +([A-Z_]+): \$\{([A-Z_]+):-(.*)\}$", compose, re.MULTILINE) if name == shell}
    for name in ("SMTP_HOST", "SMTP_PORT", "SMTP_SECURITY", "SMTP_USERNAME", "SMTP_PASSWORD", "MAIL_FROM", "REPLY_TO"):
        assert taken[name] == example[name], name


@pytest.mark.parametrize("raw", ["25:00", "8", "²²:00", "①②:00", "\u0660\u0668:00"])
def test_a_digest_time_that_is_not_a_time_of_day_names_digest_time(raw):
    # Digits of other scripts too: a superscript one crashed the process with a ValueError, and Arabic-Indic
    # ones were taken.
    assert "DIGEST_TIME" in str(config_error({"DIGEST_TIME": raw}))


def test_callback_deny_networks_default_to_link_local_and_unspecified_and_can_be_replaced():
    from ipaddress import ip_network

    assert {str(n) for n in Settings.from_env({}).callback_deny_networks} == {
        "169.254.0.0/16", "fe80::/10", "0.0.0.0/8", "::/128", "fd00:ec2::254/128", "100.100.100.200/32",
        "64:ff9b::a9fe:0/112"}
    extended = Settings.from_env({"CALLBACK_DENY_NETWORKS": "169.254.0.0/16, 10.0.0.0/8,192.0.2.1"})
    assert extended.callback_deny_networks == (ip_network("169.254.0.0/16"), ip_network("10.0.0.0/8"),
                                               ip_network("192.0.2.1/32"))
    assert Settings.from_env({"CALLBACK_DENY_NETWORKS": ""}).callback_deny_networks == ()
    error = config_error({"CALLBACK_DENY_NETWORKS": "169.254.0.0/16,metadata"})
    assert error.setting == "CALLBACK_DENY_NETWORKS" and "'metadata'" in str(error)


def test_a_digest_time_is_kept_in_one_form():
    assert Settings.from_env({"DIGEST_TIME": " 8:05"}).digest_time == "08:05"


def test_a_welcome_delay_past_the_schedule_horizon_is_refused_at_start():
    # Every user.signup was a 422 naming a delay_seconds the caller never sent.
    error = config_error({"SCHEDULE_HORIZON_DAYS": "1", "WELCOME_DELAY_SECONDS": "172800"})
    assert "WELCOME_DELAY_SECONDS" in str(error) and "SCHEDULE_HORIZON_DAYS" in str(error)
    assert Settings.from_env({"SCHEDULE_HORIZON_DAYS": "1", "WELCOME_DELAY_SECONDS": "86400"}).welcome_delay_seconds


@pytest.mark.parametrize("raw", ["https://ops:s3cret@x.example:99999", "https://ops:s3cret@x.example/?a=1",
                                 "https://ops:s3 cret@x.example", "ftp://ops:s3cret@x.example",
                                 "https://ops:s3/cr@et@x.example:0", "https://ops:s3cret@x.example#top"])
def test_public_base_url_refused_for_another_reason_does_not_quote_its_password(raw):
    # Its other checks quoted the whole URL, password included, before the one of user and password.
    error = config_error({"PUBLIC_BASE_URL": raw})
    assert error.setting == "PUBLIC_BASE_URL"
    assert "s3" not in str(error) and "ops" not in str(error) and "x.example" in str(error)
