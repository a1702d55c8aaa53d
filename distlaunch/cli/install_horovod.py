"""``distlaunch install-horovod``: build Horovod 0.28.1 for the installed torch, and check it."""
from __future__ import annotations

from pathlib import Path

import click

HELP = """Build and install Horovod 0.28.1 with MPI and Gloo (and NCCL when CUDA is present).

Horovod's last release does not build against torch 2.1 or newer (it pins C++14); this
downloads the sdist, raises it to C++17, builds a wheel against the installed torch and
installs it. The wheel is cached (per Horovod, torch and Python version), so a second
install takes seconds. Needs torch, cmake, a C++ compiler and an MPI with mpicxx.

\b
Examples:
  distlaunch install-horovod
  distlaunch install-horovod --cache-dir /shared/wheels --rebuild
"""


@click.command("install-horovod", help=HELP)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where built wheels are kept [default: ~/.cache/distlaunch/horovod].")
@click.option("--rebuild", is_flag=True, help="Build even if a cached wheel exists.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Build log file [default: build.log in the cache dir].")
def install_horovod_command(cache_dir: Path | None, rebuild: bool, log_path: Path | None) -> None:
    from ..launch.horovod_build import HOROVOD_VERSION, check_build, install

    def progress(message: str) -> None:
        click.echo(f"distlaunch: {message}", err=True)

    wheel = install(progress, cache_dir, rebuild, log_path)
    built = check_build()
    mark = {True: "[X]", False: "[ ]"}
    click.echo(f"Horovod v{HOROVOD_VERSION} ({wheel.name}):\n")
    click.echo(f"Available Frameworks:\n    {mark[built['PyTorch']]} PyTorch\n")
    click.echo(f"Available Controllers:\n    {mark[built['MPI']]} MPI\n    {mark[built['Gloo']]} Gloo\n")
    click.echo(f"Available Tensor Operations:\n    {mark[built['NCCL']]} NCCL\n    {mark[built['MPI']]} MPI\n"
               f"    {mark[built['Gloo']]} Gloo")
