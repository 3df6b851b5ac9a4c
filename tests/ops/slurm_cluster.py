"""A real one-node Slurm cluster (Debian's slurmctld, slurmd and munge) for the tests.

Everything it starts lives in one private folder: its own munge socket, its own ports, state,
spool and logs. Clients find it through ``SLURM_CONF``. It stops only the processes it started.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol")


def missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "a local Slurm needs root (slurmd runs jobs as their user)"
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if absent:
        return f"not installed: {absent} (apt-get install slurmctld slurmd slurm-client munge)"
    if not Path("/etc/munge/munge.key").is_file():
        return "no /etc/munge/munge.key (the munge package creates it)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _conf(root: Path, host: str, munge_socket: Path) -> str:
    ctld_port, d_port = _free_ports(2)
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return f"""\
ClusterName=mmlearntest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
MinJobAge=600
NodeName={host} CPUs={os.cpu_count()} RealMemory={int(mem_mb * 0.8)} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _wait(check, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    tail = log.read_text()[-2000:] if log is not None and log.is_file() else ""
    raise RuntimeError(f"local Slurm: {what} did not happen in {timeout:.0f} s\n{tail}")


@contextmanager
def local_slurm(root: Path) -> Iterator[dict[str, str]]:
    """Start munged, slurmctld and slurmd under ``root``; yield the client environment.

    ``root`` must exist and it and its parents must be searchable by the munge user.
    """
    host = socket.gethostname().split(".")[0]
    munge = pwd.getpwnam("munge")
    mdir = root / "munge"
    mdir.mkdir()
    mdir.chmod(0o755)  # munged: the socket folder must be searchable by every user
    os.chown(mdir, munge.pw_uid, munge.pw_gid)
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    munge_socket = mdir / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, host, munge_socket))
    env = dict(os.environ, SLURM_CONF=str(conf))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # munged as the munge user (it refuses root), on a private socket
        procs.append(
            subprocess.Popen(
                [
                    "/usr/sbin/munged", "-F", f"--socket={munge_socket}",
                    f"--pid-file={mdir}/munged.pid", f"--log-file={mdir}/munged.log",
                    f"--seed-file={mdir}/munged.seed",
                ],
                user=munge.pw_uid, group=munge.pw_gid, stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        _wait(munge_socket.exists, 20, "munged start", mdir / "munged.log")
        for daemon in ("slurmctld", "slurmd"):
            procs.append(
                subprocess.Popen(
                    [f"/usr/sbin/{daemon}", "-D", "-f", str(conf)], env=env,
                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip

        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True)
            return out.returncode == 0 and out.stdout.decode().strip() in ("idle", "idle*")

        _wait(idle, 60, "node idle", root / "slurmctld.log")
        yield env
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
