"""Sources of objects: the manifest directory and the Kubernetes API."""
