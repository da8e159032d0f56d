"""The benchmark's Unix users bench0001, bench0002, ...: one per server, as a hub's users are.

Both stacks submit jobs as these users (sudo). They belong to the group `hpchubbench`, have no password and
no login shell, and their homes are under the bench's work directory. `ensure` creates the missing ones;
`remove` deletes every user of the group (and their homes), so an interrupted run is cleaned up by the next.
"""
from __future__ import annotations

import grp
import pwd
import shutil
import subprocess
import time
from pathlib import Path

GROUP = "hpchubbench"
PREFIX = "bench"


def names(count: int) -> list[str]:
    return [f"{PREFIX}{i:04d}" for i in range(1, count + 1)]


def ensure(count: int, home_root: Path) -> list[str]:
    wanted = names(count)
    subprocess.run(["groupadd", "-f", GROUP], check=True)
    home_root.mkdir(parents=True, exist_ok=True)
    home_root.chmod(0o755)
    gid = grp.getgrnam(GROUP).gr_gid
    for name in wanted:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--no-create-home", "--no-user-group", "--gid", GROUP, "--home-dir",
                            str(home_root / name), "--shell", "/usr/sbin/nologin", "--comment", "hpchub benchmark",
                            name], check=True)
            entry = pwd.getpwnam(name)
        if entry.pw_gid != gid:
            raise RuntimeError(f"user {name} exists but is not in group {GROUP}: not the benchmark's, not touching it")
        home = Path(entry.pw_dir)
        if not home.is_dir():
            home.mkdir(mode=0o700)
            shutil.chown(home, entry.pw_uid, gid)
    return wanted


def remove(home_root: Path) -> int:
    """Delete every user of the benchmark's group and the homes under `home_root`; the number removed."""
    try:
        gid = grp.getgrnam(GROUP).gr_gid
    except KeyError:
        return 0
    mine = [u.pw_name for u in pwd.getpwall() if u.pw_gid == gid and u.pw_name.startswith(PREFIX)]
    for name in mine:
        # a job step the scheduler left behind: killed, and given a moment to go, before userdel
        for _ in range(50):
            if subprocess.run(["pkill", "-KILL", "-u", name], check=False).returncode != 0:
                break                   # pkill: no process matched
            time.sleep(0.1)
        subprocess.run(["userdel", name], check=True)
    shutil.rmtree(home_root, ignore_errors=True)
    subprocess.run(["groupdel", GROUP], check=False)
    return len(mine)


def home(name: str) -> str:
    return pwd.getpwnam(name).pw_dir
