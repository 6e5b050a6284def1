"""Cluster side: local Ray head, cluster launcher and KubeRay manifests."""
