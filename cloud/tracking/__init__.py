"""MLflow, the operators' console: runs, metrics, plots and the model registry. The only
package of edgeloop that imports mlflow."""
