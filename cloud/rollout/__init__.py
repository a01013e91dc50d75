"""Getting models to devices: rollouts from the registry (controller, waves, health,
webhook receiver), signed releases, the MQTT transport, and the fleet as operators see it.
Never imports cloud.learn or cloud.ingest."""
