"""Common components shared between the cloud and the edge agent: wire contract, model package."""
