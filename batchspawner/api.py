"""hpchub's hub API endpoints.

- `POST /hub/api/batchspawner`: a job says, once, which port its single-user server listens on. Unlike
  upstream batchspawner's handler, which set any spawner attribute named in the request body, it accepts
  a fixed schema (`{"port": <int>}`), only from the token of a server whose spawn is pending.
- `POST /hub/api/batchspawner/preview[?server_name=NAME][&user=NAME]`: the job script that the
  user_options in the body would submit for the user's server (the spawn form shows it), secrets
  redacted; 400 naming the field when the options are refused. Needs the `servers` scope on that server.
"""
from __future__ import annotations

import hmac
import json

from jupyterhub.apihandlers import APIHandler, default_handlers
from jupyterhub.scopes import needs_scope
from tornado import web

from .form import FormError


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


class PreviewHandler(APIHandler):
    """The job script a spawn with the posted user_options would submit, from the spawner's
    `preview_script(options)`: the same validation and rendering as a submission, nothing submitted."""

    @web.authenticated
    async def post(self) -> None:
        current = self.current_user
        # ?user=NAME: an admin on another user's spawn page previews that user's server
        user_name = self.get_argument("user", current.name if getattr(current, "kind", None) == "user" else "")
        if not user_name:
            raise web.HTTPError(400, "name the user whose server this is: ?user=NAME")
        await self._preview(user_name=user_name, server_name=self.get_argument("server_name", ""))

    @needs_scope("servers")
    async def _preview(self, user_name: str, server_name: str) -> None:
        user = self.find_user(user_name)
        if user is None:
            raise web.HTTPError(404, f"no user {user_name!r}")
        if server_name and server_name not in user.orm_spawners:
            raise web.HTTPError(404, f"{user_name} has no server named {server_name!r}")
        spawner = user.spawners[server_name]
        if not callable(getattr(spawner, "preview_script", None)):
            raise web.HTTPError(404, "this hub's spawner shows no job script preview")
        options = self.get_json_body()
        if not isinstance(options, dict):
            raise web.HTTPError(400, "expected a JSON object of user options")
        try:
            script = await spawner.preview_script(options)
        except FormError as err:
            self.set_status(400)
            self.finish(json.dumps({"status": 400, "field": err.field, "message": str(err)}))
            return
        self.finish(json.dumps({"script": script}))


# JupyterHub resolves the spawner class before it builds its handlers, so importing this package is
# enough to serve the endpoints from a plain `jupyterhub` too (as upstream batchspawner does).
for _route in ((r"/api/batchspawner", BatchSpawnerAPIHandler), (r"/api/batchspawner/preview", PreviewHandler)):
    if not any(h[1] is _route[1] for h in default_handlers):
        default_handlers.append(_route)
