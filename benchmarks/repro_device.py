"""Run the whole reproduction on one GPU machine reached by two back-to-back calls of 64 MiB each.

    python benchmarks/repro_pack.py                       # here: fill .carry/a and .carry/b
    python benchmarks/repro_device.py stage1              # call 1 (carry .carry/a): GLUE starts in the background
    python benchmarks/repro_device.py stage2 --budget S   # call 2 (carry .carry/b): E2E runs beside GLUE; after
                                                          # S seconds everything finished goes to $OUT/results.tar.gz

Files written outside $OUT survive between calls while the machine stays warm, so stage 1 keeps its
half of SmolLM2 and the GLUE runs going in /tmp/repro. Every process gets a hard deadline: runs not
started by then are skipped, runs still going are stopped and reported as missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/repro")


def untar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(dest, filter="data")


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=f"{WORK / 'src'}:{WORK / 'bench'}", HF_HUB_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    try:
        import peft  # noqa: F401
    except ImportError:  # a copy of the pure-Python package travels in case the machine lacks it
        e["PYTHONPATH"] += f":{WORK / 'site'}"
    return e


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=WORK)


def stage1(a: Path) -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    shutil.copytree(a / "src", WORK / "src")
    (WORK / "site").mkdir()
    untar(a / "site.tar.xz", WORK / "site")
    shutil.copytree(ROOT / "benchmarks", WORK / "bench")
    untar(a / "minilm.tar.xz", WORK)
    untar(a / "glue.tar.xz", WORK)
    shutil.copy(a / "smol.xz.0", WORK)
    (WORK / "deadline").write_text(str(time.time() + 540))  # stage 2 moves it; without stage 2 GLUE stops itself
    proc = start(["bench/repro_glue.py", "--grid", "--workers", "8", "--model", str(WORK / "minilm"),
                  "--data", str(WORK / "data/glue"), "--out", str(WORK / "glue"),
                  "--deadline-file", str(WORK / "deadline")], WORK / "glue.log")
    (WORK / "glue.pid").write_text(str(proc.pid))
    versions = ("import torch, transformers, peft; print('torch', torch.__version__, 'transformers', "
                "transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())")
    subprocess.run([sys.executable, "-c", versions], env=env(), cwd=WORK)
    time.sleep(15)
    print((WORK / "glue.log").read_text()[-3000:])


def stage2(b: Path, budget: float) -> None:
    t0 = time.time()
    end = t0 + budget
    sys.path.insert(0, str(WORK / "bench"))
    from repro_pack import rebuild_smollm2
    untar(b / "e2e.tar.xz", WORK)
    rebuild_smollm2([WORK / "smol.xz.0", b / "smol.xz.1"], WORK / "smol", WORK / "smollm2")
    print(f"smollm2 rebuilt in {time.time() - t0:.0f} s", flush=True)
    (WORK / "deadline").write_text(str(end - 75))  # no GLUE run starts in the last 75 s
    e2e = ["bench/repro_e2e.py", "--model", str(WORK / "smollm2"), "--data", str(WORK / "data/e2e"),
           "--out", str(WORK / "e2e")]
    procs = {name: start(e2e + extra, WORK / f"e2e_{name}.log") for name, extra in {
        "lorakit_r8": ["--method", "lorakit"], "full": ["--method", "full"], "zero-shot": ["--method", "zero-shot"],
        "lorakit_r64": ["--method", "lorakit", "--r", "64", "--no-decode"]}.items()}
    procs["glue"] = None
    glue_pid = int((WORK / "glue.pid").read_text())
    while time.time() < end:
        running = [n for n, p in procs.items() if (p.poll() is None if p else _alive(glue_pid))]
        if not running:
            break
        time.sleep(5)
    for name, p in procs.items():  # stop what the budget did not cover (each started its own session)
        pid = p.pid if p else glue_pid
        if (p.poll() is None) if p else _alive(pid):
            print(f"stopping {name}: budget reached", flush=True)
            os.killpg(pid, signal.SIGKILL)
    out = Path(os.environ.get("OUT", WORK / "out"))
    out.mkdir(parents=True, exist_ok=True)
    # at most 16 MiB a file comes back: scores and predictions, then the adapters in three parts
    parts = {"results": ["glue/json", *[str(p.relative_to(WORK)) for p in WORK.glob("e2e/*.*")],
                         *[p.name for p in WORK.glob("*.log")]],
             "glue_adapters": ["glue/adapters"], "e2e_r8": ["e2e/adapters/lorakit_r8"],
             "e2e_r64": ["e2e/adapters/lorakit_r64"]}
    for name, paths in parts.items():
        with tarfile.open(out / f"{name}.tar.gz", "w:gz") as tar:
            for sub in paths:
                if (WORK / sub).exists():
                    tar.add(WORK / sub, arcname=sub)
    done = len(list((WORK / "glue/json").glob("*.json"))) if (WORK / "glue/json").exists() else 0
    print(json.dumps({"glue_runs_done": done, "e2e": sorted(p.name for p in (WORK / "e2e").glob("*.json"))
                      if (WORK / "e2e").exists() else [], "stage2_seconds": round(time.time() - t0)}))
    for log in sorted(WORK.glob("*.log")):
        print(f"== {log.name}\n{log.read_text()[-1500:]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a finished child of an earlier call is a zombie until reaped; it counts as done
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["stage1", "stage2"])
    ap.add_argument("--budget", type=float, default=420, help="stage2: seconds until results are packed")
    args = ap.parse_args()
    if args.stage == "stage1":
        stage1(ROOT / ".carry/a")
    else:
        stage2(ROOT / ".carry/b", args.budget)


if __name__ == "__main__":
    main()
