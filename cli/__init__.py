"""The ``wsa`` command: a thin layer over the Python API.

A :class:`~wsa.errors.WsaError` prints one line on stderr and exits 1 (a traceback only with
``--debug``); usage errors exit 2 (click). An ``OSError`` (a path that is unwritable, vanished, full)
is one line naming the path. Anything else is a bug in wsa: one line saying so, the traceback with
``--debug``. Every message is printed through :func:`~wsa.text.terminal_safe` (file names and header
text are the input's, and may hold newlines or escape sequences). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import sys

import click

from wsa.errors import CollectionError, WsaError
from wsa.text import terminal_safe


class WsaGroup(click.Group):
    """Turns expected failures into one-line messages instead of tracebacks."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except WsaError as exc:
            if _debug(ctx):
                raise
            click.echo(f"error: {terminal_safe(exc, ERROR_LIMIT)}", err=True)
            if isinstance(exc, CollectionError) and len(exc.problems) > 5:
                for path, reason in exc.problems:
                    click.echo(f"  {terminal_safe(path)}: {terminal_safe(reason)}", err=True)
            sys.exit(1)
        except OSError as exc:
            if _debug(ctx):
                raise
            where = exc.filename if exc.filename is not None else "wsa"
            what = exc.strerror or str(exc) or type(exc).__name__
            click.echo(f"error: {terminal_safe(where)}: {terminal_safe(what)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted (an ingest resumes where it stopped when run again)", err=True)
            sys.exit(130)
        except Exception as exc:
            if _debug(ctx):
                raise
            click.echo(
                f"error: internal error ({type(exc).__name__}: {terminal_safe(exc, 300)}); this is a bug in wsa: "
                "run again with `wsa --debug ...` for the traceback and report it",
                err=True,
            )
            sys.exit(1)


#: Longest error message printed (a message names a file and the problem; past this it is cut).
ERROR_LIMIT = 2000


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("debug"))


def command_line(ctx: click.Context) -> list[str]:
    """The command as the user gave it, rebuilt from the parameters that came from the command line.

    Why not ``sys.argv``: it is wrong under ``CliRunner`` and in notebooks; click knows each value's source.
    """
    words = ["wsa", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        if param.name is None or ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            words.extend(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        elif getattr(param, "is_flag", False) and not getattr(param, "secondary_opts", None):
            if value:
                words.append(param.opts[0])
        elif getattr(param, "secondary_opts", None) and isinstance(value, bool):
            words.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            words.extend([param.opts[0], str(value)])
    return words


@click.group(cls=WsaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="wsa")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """wsa: weight-space analysis of fine-tuned diffusion adapters.

    \b
    Typical use:
      wsa ingest ./loras --out ./space     # folder of adapters -> on-disk matrix
      wsa info ./space                     # what was read
      wsa info ./loras                     # groups and problems before ingesting
      wsa analyze ./loras --labels a.csv --out rep      # HTML report + fitted space
      wsa sample rep --n 16 --out s / wsa edit rep --model ID --attr beard --out e
    """
    ctx.obj = {"debug": debug}


from wsa.cli import analyze, apply, export, info, ingest, synth, world  # noqa: E402  (commands register themselves)

__all__ = ["analyze", "apply", "export", "info", "ingest", "main", "synth", "world"]
