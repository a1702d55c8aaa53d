"""The estimator's promise on one host: every run works in its own snapshot of the source
dir, ./outputs and ./logs land in the run folder, data comes in through named inputs, the
CLI and the Python API take the same options and give the same run folder. (The same on
two simulated nodes: tests/test_multinode.py.) Real mpirun, real ranks, real rsync."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import SCRIPTS

from distlaunch.errors import DistlaunchError, SpecError
from distlaunch.launch.api import Job, Run, RunFailed, option_names
from distlaunch.plan.ssh import SSHOptions

pytestmark = pytest.mark.slow


def make_project(root: Path) -> tuple[Path, Path]:
    """The payload's source dir and a data folder for it."""
    src = root / "proj"
    shutil.copytree(SCRIPTS / "estimator", src)
    data = root / "data"
    data.mkdir()
    (data / "a.txt").write_text("first\n")
    (data / "b.bin").write_bytes(os.urandom(200_000))
    return src, data


def folder_view(run_dir: Path) -> dict[str, Any]:
    """What a run folder holds that must not depend on the target, nor on CLI or API."""
    def names(sub: str) -> list[str]:
        base = run_dir / sub
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())

    record = json.loads((run_dir / "run.json").read_text())
    return {
        "status": record["status"],
        "experiment": record["experiment"],
        "outputs": names("outputs"),
        "x": (run_dir / "outputs" / "x.txt").read_text(),
        "code": names("code"),
        "code_hash": record["code"]["hash"],
        "input_hash": record["inputs"][0]["hash"],
        "metrics": names("metrics"),
        "logs": [name for name in names("logs") if not name.startswith("tensorboard/")],
    }


def cli_args(src: Path, data: Path, scratch: Path | None, *extra: str) -> list[str]:
    """``distlaunch run`` of the payload with its input copied (into ``scratch``, if given)."""
    where = ["--remote-dir", str(scratch)] if scratch else []
    return ["run", *where, "--input", f"data={data}:copy", *extra, str(src / "job.py"), "--data", "{inputs.data}"]


def only_run(runs: Path) -> Path:
    found = [p for p in runs.iterdir() if (p / "run.json").is_file()]
    assert len(found) == 1, found
    return found[0]


def test_cli_and_api_give_the_same_run_folder(distlaunch, tmp_path):
    src, data = make_project(tmp_path)
    scratch = tmp_path / "scratch"
    result = distlaunch(*cli_args(src, data, scratch, "--ppn", "2"))
    assert result.returncode == 0, result.stderr
    by_cli = only_run(tmp_path / "runs")
    run = Job("job.py", str(src), {"--data": "{inputs.data}"}, ppn=2, inputs={"data": f"{data}:copy"},
              remote_dir=str(scratch), runs_root=str(tmp_path / "api-runs")).submit()
    assert run.result(timeout=120).status.value == "completed"
    view = folder_view(by_cli)
    assert view == folder_view(run.paths.root)
    # and what it holds is what the job wrote, where the estimator promises it
    assert view["x"] == "data=first helper=helper file\n"
    assert view["outputs"] == ["run-id.txt", "x.txt", "y.txt"]
    assert "extra.log" in view["logs"] and {"rank-0.log", "rank-1.log"} <= set(view["logs"])
    assert view["code"] == ["helper.txt", "job.py"] and view["experiment"] == "proj"
    assert "outputs/x.txt" in run.get_file_names()
    assert not (src / "outputs").exists() and not (tmp_path / "outputs").exists()  # nothing lands beside the code
    # the snapshot holds the code only: the job's ./outputs and ./logs moved into the run folder
    assert not (by_cli / "code" / "outputs").exists() and not (by_cli / "code" / "logs").exists()


def test_concurrent_runs_keep_their_own_outputs(tmp_path):
    src, data = make_project(tmp_path)
    argv = [sys.executable, "-m", "distlaunch", *cli_args(src, data, tmp_path / "scratch", "--ppn", "1")]
    env = {**os.environ, "SLEEP": "3"}
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if (p / "run.json").is_file())
    assert len(runs) == 2
    for run_dir in runs:  # each saw its own ./outputs all along (the job checks), and kept it
        assert (run_dir / "outputs" / "run-id.txt").read_text() == run_dir.name


def test_in_place_keeps_plain_mpirun_behaviour(tmp_path):
    src, data = make_project(tmp_path)
    argv = [sys.executable, "-m", "distlaunch", "run", "--in-place", "--ppn", "2", "--input", f"data={data}",
            "job.py", "--data", "{inputs.data}"]
    proc = subprocess.run(argv, cwd=src, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    run_dir = only_run(src / "runs")
    assert (src / "outputs" / "x.txt").read_text() == "data=first helper=helper file\n"  # the current directory
    assert (src / "logs" / "extra.log").is_file()
    assert sorted(p.name for p in (run_dir / "outputs").iterdir()) == ["y.txt"]  # only $DISTLAUNCH_OUTPUT_DIR
    assert not (run_dir / "code").exists()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["code"] is None and record["inputs"][0]["path"] == str(data)  # used in place, not copied
    assert not {"--wdir", "-wdir"} & set(record["argv"]) and not any("/code" in arg for arg in record["argv"])


def test_input_cache_is_reused_and_refreshed(distlaunch, tmp_path):
    src, data = make_project(tmp_path)
    scratch = tmp_path / "scratch"

    def run_once() -> dict[str, Any]:
        result = distlaunch(*cli_args(src, data, scratch, "--ppn", "1"))
        assert result.returncode == 0, result.stderr
        newest = sorted(p for p in (tmp_path / "runs").iterdir() if (p / "run.json").is_file())[-1]
        record = json.loads((newest / "run.json").read_text())
        return {"input": record["inputs"][0], "x": (newest / "outputs" / "x.txt").read_text(),
                "stderr": result.stderr}

    first = run_once()
    assert first["input"]["nodes"][0]["cached"] is False and first["input"]["nodes"][0]["sent"] == 2
    second = run_once()
    assert second["input"]["nodes"][0] == {"host": "localhost", "name": "data", "cached": True, "sent": 0,
                                           "sent_bytes": 0}
    assert second["input"]["path"] == first["input"]["path"] and "nothing sent" in second["stderr"]
    (data / "a.txt").write_text("second\n")
    third = run_once()
    assert third["input"]["hash"] != first["input"]["hash"] and third["input"]["path"] != first["input"]["path"]
    assert third["input"]["nodes"][0]["sent"] == 1  # b.bin did not change: hard-linked from the older entry
    assert third["x"].startswith("data=second")
    entry = Path(third["input"]["path"])
    assert (entry / "a.txt").read_text() == "second\n"
    assert os.stat(entry / "b.bin").st_ino == os.stat(Path(first["input"]["path"]) / "b.bin").st_ino


def test_a_symlinked_input_is_copied_as_what_it_points_to(distlaunch, tmp_path):
    src, data = make_project(tmp_path)
    link = tmp_path / "current"
    link.symlink_to(data)
    result = distlaunch("run", "--remote-dir", str(tmp_path / "scratch"), "--input", f"data={link}:copy",
                        str(src / "job.py"), "--data", "{inputs.data}")
    assert result.returncode == 0, result.stderr
    record = json.loads((only_run(tmp_path / "runs") / "run.json").read_text())
    entry = Path(record["inputs"][0]["path"])
    assert entry.name == "current" and entry.is_dir() and not entry.is_symlink()
    assert (entry / "a.txt").read_text() == "first\n" and record["inputs"][0]["files"] == 2
    assert not os.access(entry, os.W_OK) or os.geteuid() == 0  # read-only: no job changes the cache


def test_an_in_place_input_must_exist(distlaunch, tmp_path):
    src, _data = make_project(tmp_path)
    result = distlaunch("run", "--ppn", "1", "--input", f"data={tmp_path / 'nowhere'}", str(src / "job.py"),
                        "--data", "{inputs.data}")
    assert result.returncode == 70, result.stderr
    assert "does not exist here" in result.stderr and "':copy'" in result.stderr
    result = distlaunch("run", "--input", f"data={tmp_path / 'nowhere'}:copy", str(src / "job.py"))
    assert result.returncode == 2 and "no such file or directory here" in result.stderr
    result = distlaunch("run", "--input", "data", str(src / "job.py"))
    assert result.returncode == 2 and "expected NAME=PATH" in result.stderr
    result = distlaunch("run", str(src / "job.py"), "--data", "{inputs.data}")
    assert result.returncode == 2 and "no --input data=PATH" in result.stderr


def test_snapshot_records_and_restores_the_code_that_ran(distlaunch, tmp_path):
    src, data = make_project(tmp_path)
    args = cli_args(src, data, tmp_path / "scratch", "--ppn", "1", "--run-dir", str(src / "history"))
    assert distlaunch(*args).returncode == 0
    (src / "helper.txt").write_text("changed later\n")
    second = distlaunch(*args)
    assert second.returncode == 0, second.stderr
    first_dir, second_dir = sorted(p for p in (src / "history").iterdir() if p.is_dir())
    assert (first_dir / "code" / "helper.txt").read_text() == "helper file\n"
    assert (second_dir / "outputs" / "x.txt").read_text() == "data=first helper=changed later\n"
    # the run folders inside the source dir are never part of a snapshot
    assert sorted(p.name for p in (second_dir / "code").iterdir()) == ["helper.txt", "job.py"]
    # unchanged files are shared with the earlier snapshot, and read-only
    one, two = first_dir / "code" / "job.py", second_dir / "code" / "job.py"
    assert one.stat().st_ino == two.stat().st_ino and not one.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP)
    assert (first_dir / "code" / "helper.txt").stat().st_ino != (second_dir / "code" / "helper.txt").stat().st_ino
    show = distlaunch("runs", "show", "--run-dir", str(src / "history"), first_dir.name, "--files")
    record = json.loads((first_dir / "run.json").read_text())
    assert show.returncode == 0 and record["code"]["hash"] in show.stdout and "job.py" in show.stdout
    restored = tmp_path / "restored"
    done = distlaunch("runs", "restore", "--run-dir", str(src / "history"), first_dir.name, str(restored))
    assert done.returncode == 0, done.stderr
    assert (restored / "helper.txt").read_text() == "helper file\n" and os.access(restored / "job.py", os.W_OK)
    again = distlaunch("runs", "restore", "--run-dir", str(src / "history"), first_dir.name, str(restored))
    assert again.returncode == 73 and "not an empty folder" in again.stderr
    # a snapshot changed after its run is no longer the code that ran: restore says so
    changed = second_dir / "code" / "helper.txt"
    changed.chmod(0o600)
    changed.write_text("tampered\n")
    tampered = distlaunch("runs", "restore", "--run-dir", str(src / "history"), second_dir.name,
                          str(tmp_path / "other"))
    assert tampered.returncode == 73 and "changed after the run" in tampered.stderr
    assert not (tmp_path / "other").exists()


def test_nested_ignore_files_apply_to_their_own_folder_only(tmp_path):
    """A .gitignore's patterns are relative to its folder and reach only below it; the
    top level's reach everywhere; a likely secret is named as left out."""
    from distlaunch.nodes.treesync import list_files

    for name in ("train.py", "a/local.txt", "a/x.tmp", "a/deep/local.txt", "a/deep/y.tmp", "b/local.txt",
                 "b/x.tmp", "b/build/out.bin", "build/keep.txt", "c.log", "a/z.log", ".env"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    (tmp_path / ".gitignore").write_text("*.log\n")
    (tmp_path / "a" / ".gitignore").write_text("/local.txt\n*.tmp\n")  # anchored: a/local.txt, not a/deep/
    (tmp_path / "b" / ".gitignore").write_text("build/\n")
    tree = list_files(tmp_path)
    assert tree.files == (".gitignore", "a/.gitignore", "a/deep/local.txt", "b/.gitignore", "b/local.txt",
                          "b/x.tmp", "build/keep.txt", "train.py")
    assert tree.secrets_left_out == (".env",)


@pytest.mark.parametrize("patterns", [
    None,  # the secret patterns, as list_files uses them
    ("build", "*.o", "tmp*", ".cache", "a.b*", "*~", ".*", "*."),
])
def test_name_globs_match_as_gitignore_does(patterns):
    """The pathspec-free matcher of plain name patterns says what pathspec's gitignore
    matching says, for files and folders, at the top and deeper, inside matching folders,
    near misses included (a name ending in a newline too; one inside a path, where
    pathspec's regular expression stops, matches here all the same: for secrets, the safe
    side); a pattern it cannot take exactly (a slash, '!', a '?' or a '*' inside) makes it
    decline, so pathspec is used."""
    import pathspec

    from distlaunch.nodes.treesync import SECRET_PATTERNS, NameGlobs

    patterns = patterns or SECRET_PATTERNS
    globs = NameGlobs.of(patterns)
    assert globs is not None
    spec = pathspec.GitIgnoreSpec.from_lines(patterns)
    names = {"train.py", "README", "x", ".", "a", ""}
    for pattern in patterns:
        core = pattern.strip("*")
        names |= {pattern, core, core + "x", "x" + core, core[1:], core[:-1], core.upper(), f"x{core}x",
                  core + ".bak", "." + core}
    paths = set()
    for name in filter(None, names):
        paths |= {name, f"{name}/", f"src/{name}", f"src/{name}/", f"{name}/train.py", f"a/{name}/b/c.txt",
                  f"a/b/{name}", f"./{name}", f"/{name}", f"{name}\n", f"a/{name}\n/b"}
    # a newline inside a path stops pathspec's regular expressions; the name before it still matches here
    stricter = {path for path in paths if "\n" in path.rstrip("\n")}
    checked = {path: spec.match_file(path) for path in sorted(paths - stricter)}
    assert any(checked.values()) and not all(checked.values())
    assert {path: globs.match_file(path) for path in checked} == checked
    assert all(globs.match_file(path) for path in stricter if spec.match_file(path))
    assert any(globs.match_file(path) and not spec.match_file(path) for path in stricter)
    for odd in ("/build", "build/", "!keep", "a?c", "a*b", "[ab]", "**", "*", "#x", "x ", "\\x"):
        assert NameGlobs.of([*patterns, odd]) is None, odd


def test_a_source_dir_over_the_limits_is_refused_before_anything_is_copied(distlaunch, tmp_path):
    src = tmp_path / "home"
    src.mkdir()
    (src / "job.py").write_text("print('ran')\n")
    for i in range(5):
        (src / f"data{i}.bin").write_bytes(b"x" * (1000 * (i + 1)))
    runs = tmp_path / "runs"
    too_many = distlaunch("run", "--run-dir", str(runs), "--max-source-files", "4", str(src / "job.py"))
    assert too_many.returncode == 2, too_many.stderr
    error = too_many.stderr.splitlines()[-1]
    assert error.startswith(f"distlaunch: error: the source dir {src} holds more than 4 files to copy")
    assert "--max-source-files" in error and "--in-place" in error and ".distlaunchignore" in error
    assert "ran" not in too_many.stdout
    (folder,) = runs.iterdir()
    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "failed" and "more than 4 files" in record["error"] and record["exit_code"] == 2
    assert not (folder / "code").exists()
    too_big = distlaunch("run", "--run-dir", str(runs), "--max-source-size", "10KB", str(src / "job.py"))
    assert too_big.returncode == 2 and "holds more than 10,000 bytes to copy" in too_big.stderr
    assert "largest so far data4.bin, 4.9 KiB" in too_big.stderr and "--max-source-size" in too_big.stderr
    # exactly at both limits is allowed (6 files, 15,013 bytes); 0 in any unit lifts a limit
    total = sum(path.stat().st_size for path in src.iterdir())
    exact = distlaunch("run", "--run-dir", str(runs), "--max-source-files", "6", "--max-source-size", f"{total}B",
                       str(src / "job.py"))
    assert exact.returncode == 0 and "ran" in exact.stdout, exact.stderr
    fine = distlaunch("run", "--run-dir", str(runs), "--max-source-files", "0", "--max-source-size", "0GiB",
                      str(src / "job.py"))
    assert fine.returncode == 0 and "ran" in fine.stdout, fine.stderr
    bad = distlaunch("run", "--run-dir", str(runs), "--max-source-size", "lots", str(src / "job.py"))
    assert bad.returncode == 2 and "--max-source-size 'lots' is not a size" in bad.stderr
    with pytest.raises(RunFailed, match="more than 4 files"):
        Job("job.py", str(src), runs_root=str(runs), max_source_files=4).submit().result()


def test_a_slow_snapshot_says_how_far_it_got(tmp_path, monkeypatch):
    from distlaunch.launch import snapshot
    from distlaunch.records import RunPaths

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.txt").write_text("x" * 100)
    monkeypatch.setattr(snapshot, "SLOW_S", 0.0)
    monkeypatch.setattr(snapshot, "EVERY_S", 0.0)  # every file, so that the test need not be slow
    lines: list[str] = []
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    snap = snapshot.take(str(src), RunPaths(tmp_path / "runs" / "r1"), lines.append)
    assert [line.rsplit(" in ", 1)[0] for line in lines[:3]] == [
        f"code snapshot: {i} of 3 files ({i * 100} B of 300 B)" for i in range(3)]
    assert lines[3].startswith("code snapshot: 3 files (300 B), 3 copied, 0 unchanged, in ")
    assert snap.copied == 3


def test_a_snapshot_links_from_the_newest_earlier_one_among_the_last_runs_only(tmp_path):
    """Unchanged files are hard-linked from the newest earlier snapshot of the same source
    among the LOOK_BACK newest run folders (by name; this run's own, and folders that are
    no run's, such as sweeps/, not counted); one run folder more and that snapshot is out
    of reach, so the file is copied."""
    from distlaunch.launch import snapshot
    from distlaunch.records import RunPaths

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("same\n")
    runs = tmp_path / "runs"
    for other in (".hidden", "sweeps", "zz-notes"):  # not run folders: they take no place among the newest
        (runs / other).mkdir(parents=True)

    def take(name: str) -> snapshot.Snapshot:
        (runs / name).mkdir()
        return snapshot.take(str(src), RunPaths(runs / name), lambda _line: None)

    assert take("20260101-000010").copied == 1
    for i in range(11, 10 + snapshot.LOOK_BACK):  # LOOK_BACK - 1 newer folders with no snapshot
        (runs / f"20260101-{i:06d}").mkdir()
    (runs / "20260101-009999").mkdir()  # the next run's own folder: not counted
    reached = snapshot.take(str(src), RunPaths(runs / "20260101-009999"), lambda _line: None)
    assert (reached.linked, reached.copied) == (1, 0)
    shutil.rmtree(runs / "20260101-009999")
    (runs / f"20260101-{10 + snapshot.LOOK_BACK:06d}").mkdir()  # one more: the snapshot is out of reach
    out_of_reach = take("20260101-009999")
    assert (out_of_reach.linked, out_of_reach.copied) == (0, 1)


def test_experiments_and_tags(distlaunch, tmp_path):
    src, data = make_project(tmp_path)
    scratch = tmp_path / "scratch"
    assert distlaunch(*cli_args(src, data, scratch, "--ppn", "1", "--experiment", "base", "--tag", "lr=0.1",
                                "--tag", "quick")).returncode == 0
    assert distlaunch(*cli_args(src, data, scratch, "--ppn", "1", "--tag", "lr=0.2")).returncode == 0
    listed = distlaunch("runs", "list", "--experiment", "base")
    assert listed.returncode == 0 and listed.stdout.count("\n") == 2 and "lr=0.1,quick" in listed.stdout
    assert "no matching runs" in distlaunch("runs", "list", "--experiment", "nope").stdout
    by_tag = distlaunch("runs", "list", "--tag", "lr=0.2")
    assert by_tag.stdout.count("\n") == 2 and " proj " in by_tag.stdout  # default: the source dir's name
    assert distlaunch("runs", "list", "--tag", "quick").stdout.count("\n") == 2
    newest = sorted(p.name for p in (tmp_path / "runs").iterdir())[-1]
    assert distlaunch("runs", "tag", newest, "best", "note=keep").returncode == 0
    run = Run.load(newest, str(tmp_path / "runs"))
    run.tag("reviewed", "yes")
    details = run.get_details()
    assert details["tags"] == {"lr": "0.2", "best": "", "note": "keep", "reviewed": "yes"}
    assert details["experiment"] == "proj" and details["runId"] == newest and details["status"] == "completed"
    assert details["properties"]["code_hash"] == details["record"]["code"]["hash"]
    assert details["inputDatasets"][0]["name"] == "data" and "rank-0.log" in details["logFiles"]
    assert details["startTimeUtc"].endswith("Z") and details["endTimeUtc"] >= details["startTimeUtc"]
    assert distlaunch("runs", "list", "--tag", "best").stdout.count("\n") == 2
    bad = distlaunch("run", "--experiment", "no spaces", str(src / "job.py"))
    assert bad.returncode == 2 and "--experiment" in bad.stderr


def sample_options(tmp_path: Path, src: Path, data: Path) -> dict[str, Any]:
    """A value other than the default for every option of ``distlaunch run``."""
    hostfile, reqs, envfile, key = (tmp_path / name for name in ("hosts.txt", "reqs.txt", "vars.env", "key"))
    hostfile.write_text("localhost slots=2\n")
    reqs.write_text("six\n")
    envfile.write_text("FROM_FILE=1\n")
    key.write_text("not a key\n")
    return {
        "nodes": 1, "ppn": 3, "np": 3, "hosts": "localhost:4", "hostfile": str(hostfile), "oversubscribe": True,
        "use_gpu": False, "gpus_per_rank": 2, "gpus": "0,1", "ssh_config": str(hostfile), "ssh_port": 2222,
        "ssh_key": str(key), "remote_root": str(tmp_path / "scratch"), "mpi_args": ["--mca", "btl", "tcp,self"],
        "mpirun": "/opt/mpi/bin/mpirun", "source_dir": str(tmp_path), "no_sync": True, "collect_all_ranks": True,
        "skip_checks": True, "env_items": {"A": "1"}, "env_files": [str(envfile)], "pip_packages": ["six"],
        "requirements": str(reqs), "env_pass": ["MY_*"], "runs_root": str(tmp_path / "elsewhere"),
        "iface": "eth0", "launcher": "srun", "in_place": True, "max_source_files": 7, "max_source_size": "1MiB",
        "experiment": "exp1", "tags": {"a": "b"},
        "inputs": {"data": str(data)}, "kill_grace": 1.5, "timeout": 30, "hang_timeout": "2m",
        "hvd_backend": "torch", "hvd_ops": "mpi", "max_restarts": 2, "restart_delay": 0.5, "min_nodes": 1,
        "quarantine_ttl": "10m", "container": str(tmp_path / "image"), "container_runtime": "apptainer",
        "container_binds": ["/data:/mnt/data"], "container_python": "/opt/venv/bin/python",
    }


# options that mean something only beside another: each is tried on a Job that has that one
COMPANIONS = {"container_runtime": {"container": "/images/train"}, "container_binds": {"container": "/images/train"},
              "container_python": {"container": "/images/train"}}


# which field of the JobSpec (or of the Watch) each option must set, and nothing else
FIELDS = {
    "nodes": "target.nodes", "ppn": "target.ppn", "np": "target.np", "hosts": "target.hosts",
    "hostfile": "target.hostfile", "oversubscribe": "target.oversubscribe", "use_gpu": "target.use_gpu",
    "gpus_per_rank": "target.gpus_per_rank", "gpus": "target.gpus", "ssh_config": "ssh.config", "ssh_port": "ssh.port",
    "ssh_key": "ssh.key", "remote_root": "remote_root", "mpi_args": "mpi_args", "mpirun": "mpirun",
    "source_dir": "source_dir", "no_sync": "sync", "collect_all_ranks": "collect_all_ranks",
    "skip_checks": "skip_checks", "env_items": "env", "env_files": "env", "pip_packages": "pip_packages",
    "requirements": "requirements", "env_pass": "env_pass", "runs_root": "runs_root", "iface": "iface",
    "max_source_files": "max_source_files", "max_source_size": "max_source_bytes",
    "launcher": "launcher", "in_place": "in_place", "experiment": "experiment", "tags": "tags", "inputs": "inputs",
    "kill_grace": "watch.kill_grace", "timeout": "watch.timeout", "hang_timeout": "watch.hang_timeout",
    "hvd_backend": "env", "hvd_ops": "env", "max_restarts": "max_restarts", "restart_delay": "restart_delay",
    "min_nodes": "min_nodes", "quarantine_ttl": "quarantine_ttl", "container": "container",
    "container_runtime": "container", "container_binds": "container", "container_python": "container",
}


def fields(job: Job) -> list[tuple[str, str]]:
    """(field, value) of everything a Job carries, flattened: target.*, ssh.*, watch.*."""
    import dataclasses

    found = []
    for prefix, obj in (("", job.spec), ("watch.", job.watch)):
        for item in dataclasses.fields(obj):
            value = getattr(obj, item.name)
            if dataclasses.is_dataclass(value) and item.name in ("target", "ssh"):
                found += [(f"{item.name}.{sub.name}", repr(getattr(value, sub.name)))
                          for sub in dataclasses.fields(value)]
            elif item.name != "script":  # source_dir's case moves the script; the rest keep it
                found.append((f"{prefix}{item.name}", repr(value)))
    return found


def test_the_api_takes_every_option_of_the_cli(tmp_path):
    src, data = make_project(tmp_path)
    samples = sample_options(tmp_path, src, data)
    assert sorted(samples) == option_names() == sorted(FIELDS)  # a new option of 'distlaunch run' must reach Job
    for name, value in samples.items():
        base = Job("job.py", str(src), **COMPANIONS.get(name, {}))
        if name == "source_dir":  # the estimator's own argument, given as an option
            job = Job(str(src / "job.py"), source_dir=value)
        else:
            job = Job("job.py", str(src), **{**COMPANIONS.get(name, {}), name: value})
        changed = sorted(set(fields(job)) ^ set(fields(base)))
        assert changed and {item[0] for item in changed} == {FIELDS[name]}, (name, changed)
    job = Job("job.py", str(src), env={"A": "1", "B": "two words"}, mpi_args=["--mca", "btl", "tcp,self"],
              tags={"lr": 0.1, "quick": ""}, inputs={"data": f"{data}:copy"}, timeout=90, sync=False,
              ssh=SSHOptions(port=2200), remote_dir="/tmp/elsewhere", pip=["six"])
    assert job.spec.env == (("A", "1"), ("B", "two words"))
    assert job.spec.mpi_args == ("--mca", "btl", "tcp,self")
    assert job.spec.tags == (("lr", "0.1"), ("quick", ""))
    assert job.spec.inputs[0].copy and job.spec.inputs[0].path == str(data)
    assert job.watch.timeout == 90 and job.spec.sync is False and job.spec.ssh.port == 2200
    assert job.spec.remote_root == "/tmp/elsewhere" and job.spec.pip_packages == ("six",)
    # the same checks as on the command line, one line each
    with pytest.raises(SpecError, match="no option 'bogus'"):
        Job("job.py", str(src), bogus=1)
    with pytest.raises(SpecError, match=r"Job\(ppn=0\)"):
        Job("job.py", str(src), ppn=0)
    with pytest.raises(SpecError, match="terminal option"):
        Job("job.py", str(src), dry_run=True)
    with pytest.raises(SpecError, match="'pbs' is not one of 'mpirun', 'srun'"):
        Job("job.py", str(src), launcher="pbs")


def test_a_run_is_a_future(tmp_path):
    script = SCRIPTS / "rank_file.py"
    calls: list[str] = []
    good = Job(script.name, str(script.parent), ppn=2, runs_root=str(tmp_path / "runs"),
               env={"OUT_DIR": str(tmp_path)}).submit()
    good.add_done_callback(lambda run: calls.append(f"good {run.status} {run.done()}"))
    assert good.result(timeout=120).status.value == "completed" and good.exception() is None
    assert calls == ["good completed True"] and good.done() and not good.running() and not good.cancelled()
    good.add_done_callback(lambda run: calls.append("late"))  # already done: called at once
    assert calls[-1] == "late"
    bad = Job(script.name, str(script.parent), ppn=2, runs_root=str(tmp_path / "runs"),
              env={"OUT_DIR": str(tmp_path), "FAIL_RANK": "1", "FAIL_CODE": "3"}).submit()
    with pytest.raises(RunFailed, match="rank 1 .*exited with code 3") as raised:
        bad.result(timeout=120)
    assert raised.value.exit_code == 3 and isinstance(raised.value, DistlaunchError)
    assert isinstance(bad.exception(), RunFailed)
    details = bad.wait_for_completion(raise_on_error=False)
    assert details["status"] == "failed" and "rank 1" in details["error"]
    with pytest.raises(RunFailed):
        bad.wait_for_completion()
    # a past run, reopened: the same calls, from its record
    again = Run.load(bad.id, str(tmp_path / "runs"))
    assert again.done() and isinstance(again.exception(), RunFailed)
