"""The embedded default's login: one demo user with a password generated at every start."""
from __future__ import annotations

import hmac
import secrets

from jupyterhub.auth import Authenticator
from traitlets import Unicode, default


class DemoAuthenticator(Authenticator):
    """Lets exactly one user in, with a one-time password that hpchub prints when it starts.

    For trying hpchub on a laptop; a site configures a real authenticator (LDAP) instead."""

    demo_user = Unicode("demo", help="Name of the demo user.").tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.password = secrets.token_urlsafe(12)

    @default("allowed_users")
    def _default_allowed_users(self) -> set[str]:
        return {self.demo_user}

    @default("admin_users")
    def _default_admin_users(self) -> set[str]:
        return {self.demo_user}

    async def authenticate(self, handler, data: dict) -> str | None:
        username, password = data.get("username", ""), data.get("password", "")
        if username == self.demo_user and hmac.compare_digest(password.encode(), self.password.encode()):
            return username
        return None
