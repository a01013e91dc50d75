"""The MLflow registry webhook that tells our receiver when an alias moves (MLflow 3.3+,
SQL-backed tracking server): created once, kept pointing at the receiver's URL and secret."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from cloud.config import CloudSettings
from cloud.tracking.connect import mlflow_client

log = logging.getLogger(__name__)

ALIAS_CREATED: Final[Literal["model_version_alias.created"]] = "model_version_alias.created"
DEFAULT_NAME = "edgeloop-rollouts"


@dataclass(frozen=True)
class WebhookInfo:
    webhook_id: str
    name: str
    url: str
    created: bool  # False: one of that name was updated


def ensure_webhook(
    *,
    tracking_uri: str,
    url: str,
    secret: str,
    name: str = DEFAULT_NAME,
    settings: CloudSettings | None = None,
) -> WebhookInfo:
    """Create the webhook ``name`` for ``model_version_alias.created``, delivering to
    ``url`` signed with ``secret``; if one of that name exists, point it there instead (and
    make it active), so running this again never adds a second."""
    client = mlflow_client(tracking_uri, settings)
    found = next((w for w in _all(client) if w.name == name), None)
    if found is None:
        hook = client.create_webhook(
            name=name,
            url=url,
            events=[ALIAS_CREATED],
            description="edgeloop: a moved champion alias starts a rollout",
            secret=secret,
        )
        log.info("created MLflow webhook %s (%s) → %s", name, hook.webhook_id, url)
        return WebhookInfo(hook.webhook_id, name, url, created=True)
    client.update_webhook(
        found.webhook_id, url=url, events=[ALIAS_CREATED], secret=secret, status="ACTIVE"
    )
    log.info("updated MLflow webhook %s (%s) → %s", name, found.webhook_id, url)
    return WebhookInfo(found.webhook_id, name, url, created=False)


def delete_webhook(
    *, tracking_uri: str, name: str = DEFAULT_NAME, settings: CloudSettings | None = None
) -> bool:
    """Remove the webhook ``name`` (True if there was one)."""
    client = mlflow_client(tracking_uri, settings)
    found = [w for w in _all(client) if w.name == name]
    for hook in found:
        client.delete_webhook(hook.webhook_id)
    return bool(found)


def _all(client: Any) -> Iterator[Any]:
    """Every webhook of the server, page by page."""
    token = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        yield from page
        token = page.token
        if not token:
            return
