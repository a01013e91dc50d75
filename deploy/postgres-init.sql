-- A second database for MLflow's tracking and registry store.
CREATE DATABASE mlflow OWNER edgeloop;
