"""The hpchub command's defaults (no hub is started: the application object is configured and read)."""
from __future__ import annotations

from pathlib import Path

import pytest
from traitlets.config import Config

from batchspawner import LocalBatchSpawner
from hpchub.app import HpcHub
from hpchub.demo import DemoAuthenticator


@pytest.fixture
def app(tmp_path: Path, monkeypatch) -> HpcHub:
    monkeypatch.setenv("HPCHUB_DATA_DIR", str(tmp_path / "data"))
    HpcHub.clear_instance()
    hub = HpcHub.instance()
    yield hub
    HpcHub.clear_instance()


def test_embedded_default(app: HpcHub, tmp_path: Path):
    assert app.spawner_class is LocalBatchSpawner and app.authenticator_class is DemoAuthenticator
    assert app.bind_url == "http://127.0.0.1:8000"
    assert app.data_dir == str(tmp_path / "data")
    assert app.db_url == f"sqlite:///{tmp_path / 'data' / 'jupyterhub.sqlite'}"


def test_a_port_alone_keeps_the_hub_on_loopback(app: HpcHub):
    app.parse_command_line(["--port=8123"])
    assert app.bind_url == "http://127.0.0.1:8123/"


def test_queued_jobs_do_not_count_against_jupyterhubs_spawn_limit(app: HpcHub):
    # JupyterHub counts a spawn as pending until its server answers: queue wait included
    assert app.concurrent_spawn_limit == 0


def test_data_dir_holds_the_ledger_and_proxy_pid(app: HpcHub, tmp_path: Path):
    app.load_config_file("no-such-config.py")
    assert app.config.BatchSpawner.ledger_url == f"sqlite:///{tmp_path / 'data' / 'hpchub_ledger.sqlite'}"
    assert app.config.ConfigurableHTTPProxy.pid_file == str(tmp_path / "data" / "proxy.pid")
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700


def test_a_site_ledger_url_is_kept(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HPCHUB_DATA_DIR", str(tmp_path / "data"))
    config = Config()
    config.BatchSpawner.ledger_url = "postgresql+psycopg://hpchub@db/hpchub"
    HpcHub.clear_instance()
    hub = HpcHub.instance(config=config)
    try:
        hub.load_config_file("no-such-config.py")
        assert hub.config.BatchSpawner.ledger_url == "postgresql+psycopg://hpchub@db/hpchub"
    finally:
        HpcHub.clear_instance()
