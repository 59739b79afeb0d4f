"""The [wecom] config section: env overrides, secret files, validation with clear errors, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ConfigError, load_settings, redacted

AES = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
ENV = {"CLAW_WECOM__CORP_ID": "ww0123456789abcdef", "CLAW_WECOM__AGENT_ID": "1000002",
       "CLAW_WECOM__SECRET": "s3cr3t-value", "CLAW_WECOM__TOKEN": "QDG6eK", "CLAW_WECOM__ENCODING_AES_KEY": AES}


def test_off_by_default() -> None:
    s = load_settings(env={})
    assert not s.wecom.enabled and s.wecom.api_base == "https://qyapi.weixin.qq.com"


def test_env_overrides_enable_the_channel_and_secrets_are_redacted() -> None:
    s = load_settings(env=ENV)
    assert s.wecom.enabled and s.wecom.agent_id == 1000002 and s.wecom.corp_id == "ww0123456789abcdef"
    shown = redacted(s)["wecom"]
    assert shown["secret"] == shown["token"] == shown["encoding_aes_key"] == "***"
    assert "s3cr3t-value" not in repr(redacted(s))


def test_secrets_from_files_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "wecom.secret").write_text("from-file\n")
    (tmp_path / "secrets" / "wecom.aes").write_text(AES + "\n")
    cfg = tmp_path / "a.toml"
    cfg.write_text('[wecom]\ncorp_id = "ww1"\nagent_id = 5\ntoken = "T0ken"\n'
                   'secret_file = "secrets/wecom.secret"\nencoding_aes_key_file = "secrets/wecom.aes"\n')
    s = load_settings(cfg, env={})
    assert s.wecom.secret == "from-file" and s.wecom.encoding_aes_key == AES


@pytest.mark.parametrize("env, words", [
    ({"CLAW_WECOM__CORP_ID": "ww1"}, "set together"),
    ({**ENV, "CLAW_WECOM__ENCODING_AES_KEY": "short"}, "encoding_aes_key"),
    ({**ENV, "CLAW_WECOM__TOKEN": "has space"}, "wecom.token"),
    ({**ENV, "CLAW_WECOM__API_BASE": "qyapi.weixin.qq.com"}, "api_base"),
    ({**ENV, "CLAW_WECOM__PER_USER_PER_MIN": "31"}, "per_user_per_min"),
    ({**ENV, "CLAW_WECOM__AGENT_ID": "abc"}, "agent_id"),
    ({**ENV, "CLAW_WECOM__NO_SUCH_KEY": "1"}, "no_such_key"),
])
def test_bad_values_are_clear_errors_without_secrets(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(env=env)
    assert words in str(e.value)
    assert "s3cr3t-value" not in str(e.value) and AES not in str(e.value)
