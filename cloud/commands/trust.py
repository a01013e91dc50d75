"""`edgeloop fleet rotate-root`: the operator's root key rotation (and online key recovery)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import typer

from shared.errors import EdgeloopError


def rotate_root_cmd(
    fleet: str = typer.Option(..., help="The fleet whose TUF root is rotated."),
    offline_dir: Path = typer.Option(
        ...,
        help="Where the fleet's offline keys are (root and targets, in a folder named after "
        "the fleet): the operator's media, never a service's disk. The new root key is "
        "written there.",
    ),
    keys_dir: Path | None = typer.Option(
        None, help="The rollout worker's online keys (default: EDGELOOP_TUF_KEYS_DIR)."
    ),
    online: bool = typer.Option(
        False,
        "--online/--keep-online",
        help="Also replace the releases, snapshot and timestamp keys: the recovery for a "
        "lost or compromised online key (the old ones stop verifying on every device).",
    ),
    targets: bool = typer.Option(
        False,
        "--targets/--keep-targets",
        help="Also replace the targets key (kept offline beside root): for a lost or stolen one.",
    ),
    new_key: Path | None = typer.Option(
        None,
        help="The new root private key (PKCS#8 PEM, Ed25519) if made elsewhere, e.g. on an "
        "air-gapped machine; default: a fresh key generated here.",
    ),
    root_expiry_days: int = typer.Option(365, min=1, help="Expiry of the new root."),
    targets_expiry_days: int = typer.Option(365, min=1, help="Expiry of the re-signed targets."),
) -> None:
    """Sign root N+1 with the old and the new root keys. Devices enrolled with any older
    root accept it at their next update, without re-enrolling. Targets is re-signed with a
    renewed expiry, so run this at least once within each expiry (a year by default)."""
    from securesystemslib.signer import CryptoSigner

    from cloud.commands.common import sessions
    from cloud.config import get_settings
    from cloud.rollout.settings import lock_fleet
    from cloud.rollout.signing import Expiries, rotate_root
    from cloud.store.objects import open_store

    settings = get_settings()
    # Under the fleet's row lock, as every publish and timestamp refresh is: they compute
    # their next versions from what is stored, and a rotation rewrites it.
    session = sessions()()
    try:
        lock_fleet(session, fleet)
        signer = None
        if new_key is not None:
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            signer = CryptoSigner(load_pem_private_key(new_key.read_bytes(), None))
        version = rotate_root(
            store=open_store(settings),
            fleet=fleet,
            offline_dir=offline_dir,
            keys_dir=keys_dir or settings.resolved_tuf_keys_dir,
            online=online,
            targets=targets,
            new_root_key=signer,
            expiries=Expiries(
                root=timedelta(days=root_expiry_days), targets=timedelta(days=targets_expiry_days)
            ),
        )
    except (EdgeloopError, OSError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    finally:
        session.commit()
        session.close()
    keys = ["root", *(["targets"] if targets else []), *(["online"] if online else [])]
    typer.echo(f"fleet {fleet}: root v{version} signed; new {', '.join(keys)} key(s) written")
