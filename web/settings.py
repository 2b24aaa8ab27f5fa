"""Settings of the web page's process: the shared ones plus where it listens and who may use it."""

from __future__ import annotations

import ipaddress

from pydantic import Field, SecretStr, field_validator

from imagine.settings import FrontEndSettings


class WebSettings(FrontEndSettings):
    web_host: str = Field("127.0.0.1", description="Address the web page listens on; loopback unless WEB_AUTH is set.")
    web_port: int = Field(8080, ge=1, le=65535, description="Port of the web page.")
    web_auth: SecretStr | None = Field(
        None, description="user:password everyone must give to use the page (required off loopback)."
    )
    web_admin_auth: SecretStr | None = Field(
        None, description="user:password of the operator's page (/admin); unset: no operator's page."
    )
    max_pending_per_browser: int = Field(2, ge=1, description="Jobs one browser may have queued or running at once.")
    browser_cooldown_s: float = Field(5.0, ge=0, description="Least time between two submissions of one browser.")
    reload_timeout_s: float = Field(30.0, gt=0, description="How long the operator's reload waits for the workers.")

    @field_validator("web_auth", "web_admin_auth")
    @classmethod
    def _user_and_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            user, colon, password = value.get_secret_value().partition(":")
            if not (user and colon and password):
                raise ValueError("must be user:password, both non-empty")
        return value

    @property
    def listens_on_loopback(self) -> bool:
        if self.web_host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.web_host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return False
