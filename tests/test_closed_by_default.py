"""Closed by default: a local Ray listens on loopback only, and Ray's token file is private."""
import ipaddress
import os
import stat
import threading

import psutil

from orchestrator.cli import main
from orchestrator.cluster import secure_token_file
from test_sweep import TWO_TRIALS, sweep_args


def listening(processes) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of `processes`."""
    found = set()
    for proc in processes:
        try:
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((proc.name(), c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # a worker that ended between the listing and the look
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:  # ::ffff:127.0.0.1 on a dual-stack socket
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_a_local_sweep_listens_on_loopback_only(ray_local, tmp_path):
    """Every socket that Ray's processes (GCS, raylet, agents, workers, trial actors) listen on while a sweep
    runs, sampled twice a second; the processes are this test session's children, as Ray started them."""
    me = psutil.Process()
    seen: set = set()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            seen.update(listening(me.children(recursive=True)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        path = tmp_path / "two.yaml"
        path.write_text(TWO_TRIALS.replace("epochs: 20", "epochs: 2"))
        _, args = sweep_args(tmp_path)
        assert main(["sweep", str(path), "--name", "closed", *args]) == 0
    finally:
        done.set()
        watcher.join()
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names and len(seen) >= 4  # the watch saw Ray's servers and workers
    assert [s for s in seen if not is_loopback(s[1])] == []


def test_rays_token_file_is_created_private_and_an_open_one_is_tightened(tmp_path, monkeypatch):
    token = tmp_path / "ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    secure_token_file(local=False)
    assert not token.exists()  # joining a cluster: its token comes from the user, none is made up
    secure_token_file(local=True)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    first = token.read_text()
    os.chmod(token, 0o644)  # as `ray get-auth-token --generate` writes it
    secure_token_file(local=False)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == first
