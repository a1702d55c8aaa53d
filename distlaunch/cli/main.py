"""Entry point: the ``distlaunch`` click group and the mapping of errors to exit codes."""
from __future__ import annotations

import logging
import sys

import click

from .. import __version__
from ..errors import DistlaunchError, ExitCode

# each command's module, imported only when that command runs (or --help lists them
# all): 'distlaunch run' does not pay for the sweep's, the benchmarks' or history's code
COMMANDS = {
    "run": "run:run_command", "submit": "submit:submit_command", "hosts": "hosts:hosts_command",
    "install-horovod": "install_horovod:install_horovod_command", "doctor": "doctor:doctor_command",
    "runs": "runs:runs_group", "logs": "runs:logs_command", "download": "runs:download_command",
    "cancel": "runs:cancel_command", "bench": "bench:bench_group", "nodes": "nodes:nodes_group",
    "sweep": "sweep:sweep_group",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported from ``COMMANDS`` on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        import importlib

        module, _, name = COMMANDS[cmd_name].partition(":")
        command = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        self.add_command(command, cmd_name)
        return command

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        finally:  # the command is imported (or was, by an earlier main() of this process)
            _imported()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="distlaunch")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Launch distributed training jobs with MPI on localhost, clusters and allocations.

    \b
    Examples:
      distlaunch run --ppn 2 examples/train.py --epochs 2
      distlaunch run --hosts node1:4,node2:4 train.py --lr 0.1
      distlaunch run --dry-run --nodes 2 --ppn 4 --hostfile hostfiles/two-nodes-4-gpus.txt train.py

    Every option can also be set from the environment as DISTLAUNCH_<COMMAND>_<OPTION>,
    e.g. DISTLAUNCH_RUN_PPN=4.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="distlaunch: %(message)s", stream=sys.stderr)


# what users of other launchers type, and what it is called here
FOREIGN_OPTIONS = {
    "--nproc-per-node": "--ppn (ranks per host)", "--nproc_per_node": "--ppn (ranks per host)",
    "--nnodes": "--nodes", "-np": "-n N or --np N (ranks in all)", "--num-proc": "-n N",
    "--hostfile-path": "--hostfile", "--host": "-H/--hosts", "--npernode": "--ppn", "-npernode": "--ppn",
    "--num_gpus": "--ppn with --use-gpu", "--num_nodes": "--nodes",
}


def usage_message(exc: click.UsageError) -> str:
    """One line for a usage error, with a hint when the user typed another launcher's flag."""
    command = exc.ctx.command_path if exc.ctx is not None else "distlaunch"
    if isinstance(exc, click.NoSuchOption) and exc.option_name in FOREIGN_OPTIONS:
        return (f"{exc.option_name} is not a distlaunch option: here it is {FOREIGN_OPTIONS[exc.option_name]} "
                f"(see '{command} --help')")
    if isinstance(exc, click.BadParameter) and exc.param is not None and exc.param.name == "np" \
            and "'p'" in exc.format_message():
        return f"-np is mpirun's spelling: here it is {FOREIGN_OPTIONS['-np']} (see '{command} --help')"
    return f"{exc.format_message()} (see '{command} --help')"


_collector_was: bool | None = None  # while main() has the collector off: whether it was on before


def _imported() -> None:
    """In main(), once the command's modules are imported: freeze what exists for the
    collector, and let it collect again (if it was on when main() began). Those objects
    (modules, classes, functions: click's and ours) live until the process ends anyway;
    walking them took ~30 collections during the import and every full one after it
    (~5 ms in all, and ~4 ms more at exit). Garbage cycles made while importing (a few
    enum classes of the standard library's) stay. Anywhere else (CliRunner, a notebook)
    the caller's collector is not touched."""
    global _collector_was
    if _collector_was is None:
        return
    import gc

    gc.freeze()
    if _collector_was:
        gc.enable()
    _collector_was = None


def _before_exit() -> None:
    """At the interpreter's exit (an atexit handler): collect what is garbage by now, its
    finalizers running as usual, then freeze the rest for the collector, so the
    teardown does not walk and free every object of click's and ours one by one (about
    12 ms of every command; the memory goes back with the process). Other atexit
    handlers, weakref finalizers (temporary directories) and logging's flush run as
    usual; an object still alive in a reference cycle is not finalized at teardown, as
    Python does not promise it would be."""
    import gc

    gc.collect()
    gc.freeze()


def main() -> None:
    """Run the CLI; every error is one line on stderr and a documented exit code. The
    process's entry point: it always ends in ``sys.exit``."""
    import atexit
    import gc

    global _collector_was
    atexit.unregister(_before_exit)  # once, however often main() is called in one process
    atexit.register(_before_exit)
    _collector_was = gc.isenabled()
    gc.disable()  # until the command's modules are imported (``_imported``)
    try:
        _run_cli()
    finally:  # ended before a command was chosen (--help, --version, a usage error)
        if _collector_was:
            gc.enable()
        _collector_was = None


def _run_cli() -> None:
    try:
        code = cli.main(prog_name="distlaunch", auto_envvar_prefix="DISTLAUNCH", standalone_mode=False)
    except DistlaunchError as exc:
        click.echo(f"distlaunch: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        click.echo(f"distlaunch: error: {usage_message(exc)}", err=True)
        sys.exit(ExitCode.USAGE)
    except click.ClickException as exc:
        click.echo(f"distlaunch: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("distlaunch: aborted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
