"""One import name: the distribution installs `smtp_session` and nothing else at the top.

A web backend that installs it for the client may have its own `tasks` or `worker`
module; those must stay its own.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DIST_INFO_SUFFIX = ".dist-info"
#: Bound on building the wheel (pip fetches the build backend once, then from its cache).
BUILD_TIMEOUT = 300


def test_the_wheel_holds_smtp_session_and_nothing_else(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), "."],
        cwd=REPO,
        check=True,
        timeout=BUILD_TIMEOUT,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        session = archive.read("smtp_session/tasks/session.py")

    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(DIST_INFO_SUFFIX)} == {"smtp_session"}
    # The repository's folders (linked into smtp_session/) are in it as files.
    for package in ("tasks", "worker", "monitoring"):
        assert f"smtp_session/{package}/__init__.py" in names
    assert b"async def open_session(" in session
    assert not [name for name in names if name.startswith(("tests/", "bench/", "deploy/"))]


def test_a_backends_own_tasks_and_worker_modules_stay_its_own(tmp_path: Path) -> None:
    # A backend's project with modules of those names, importing our client beside them.
    for name in ("tasks", "worker", "monitoring"):
        (tmp_path / f"{name}.py").write_text(f"OWNER = 'backend {name}'\n")
    program = (
        "import sys, tasks, worker, monitoring\n"
        "from smtp_session.worker.client import result, submit\n"
        "import smtp_session.worker.app\n"
        "print(tasks.OWNER, worker.OWNER, monitoring.OWNER, sep=',')\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in "
        "{'tasks', 'worker', 'monitoring'} and '.' in name))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "SMTP_SESSION_DATA_DIR": str(tmp_path / "data")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    owners, submodules = run.stdout.splitlines()
    assert owners == "backend tasks,backend worker,backend monitoring"
    assert submodules == "[]"  # nothing of ours was imported under those names
