"""The ``edgeloop`` command: a thin front door that mounts each installed side's commands.

The cloud, edge agent and simulation each declare their commands as entry points in the
``edgeloop.commands`` group, so this module never imports them by name and an edge-only
install shows only the edge commands.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from importlib.metadata import entry_points

import typer

HELP = """edgeloop: cloud-edge continuous learning for industrial fault prediction.

Edge agents run a compressed model on sensor windows and upload the windows they are
unsure about; the cloud stores them, retrains, registers the new model in MLflow and
sends it back to the devices.

Start with `edgeloop demo`, which runs the whole loop on one machine with embedded
defaults (SQLite, in-process MQTT broker, local object store, MLflow sqlite store).
"""


class JsonFormatter(logging.Formatter):
    """Structured logs: time, level, logger, message, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def build_app() -> typer.Typer:
    app = typer.Typer(
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        rich_markup_mode="markdown",
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        verbose: bool = typer.Option(
            False, "--verbose", "-v", help="Log what each part does (INFO)."
        ),
        log_json: bool = typer.Option(
            os.environ.get("EDGELOOP_LOG_FORMAT") == "json",
            "--log-json",
            help="One JSON object per log line (for journald, Loki, ...); "
            "also EDGELOOP_LOG_FORMAT=json.",
        ),
    ) -> None:
        handler = logging.StreamHandler()
        handler.setFormatter(
            JsonFormatter()
            if log_json
            else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logging.basicConfig(
            level=logging.INFO if verbose else os.environ.get("EDGELOOP_LOG_LEVEL", "WARNING"),
            handlers=[handler],
        )

    for ep in sorted(entry_points(group="edgeloop.commands"), key=lambda e: e.name):
        try:
            command = ep.load()
        except ImportError as exc:  # that side's extra is not installed here
            logging.getLogger(__name__).debug("command %s unavailable: %s", ep.name, exc)
            continue
        if isinstance(command, typer.Typer):
            app.add_typer(command, name=ep.name)
        else:
            app.command(name=ep.name)(command)
    return app


def main() -> None:
    build_app()()
