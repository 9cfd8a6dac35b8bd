"""Access policy: who may call whom (AccessPolicy resources → Envoy RBAC filters)."""
