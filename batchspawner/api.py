"""The hub endpoint a job calls once to say which port its single-user server listens on.

Unlike upstream batchspawner's handler, which set any spawner attribute named in the request body, this
one accepts a fixed schema (`{"port": <int>}`), only from the token of a server whose spawn is pending.
"""
from __future__ import annotations

import hmac
import json

from jupyterhub.apihandlers import APIHandler, default_handlers
from tornado import web


class BatchSpawnerAPIHandler(APIHandler):
    @web.authenticated
    async def post(self) -> None:
        token = self.get_auth_token() or ""
        spawner = self._spawner_for_token(token)
        if spawner is None:
            raise web.HTTPError(403, "this token belongs to no pending batch job")
        body = self.get_json_body() or {}
        port = body.get("port") if isinstance(body, dict) else None
        if set(body) != {"port"} or not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise web.HTTPError(400, 'expected exactly {"port": <1-65535>}')
        if not spawner.report_port(port):
            raise web.HTTPError(409, "this server's port was already reported")
        self.set_status(201)
        self.finish(json.dumps({"message": "port received"}))

    def _spawner_for_token(self, token: str):
        from .spawner import BatchSpawner

        user = self.current_user
        for spawner in getattr(user, "spawners", {}).values():
            if (
                isinstance(spawner, BatchSpawner)
                and spawner.api_token
                and hmac.compare_digest(spawner.api_token, token)
            ):
                return spawner
        return None


# JupyterHub resolves the spawner class before it builds its handlers, so importing this package is
# enough to serve the endpoint from a plain `jupyterhub` too (as upstream batchspawner does).
if not any(h[1] is BatchSpawnerAPIHandler for h in default_handlers):
    default_handlers.append((r"/api/batchspawner", BatchSpawnerAPIHandler))
