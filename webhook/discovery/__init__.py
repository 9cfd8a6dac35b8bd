"""Discovery: the control plane that knows the mesh and programs every sidecar over xDS.

Sources (the Kubernetes API through the official client, or a directory of manifests) feed one
:class:`~webhook.discovery.store.ObjectStore`; the xDS side reads the store and pushes to the
sidecars that need each change.
"""
