"""Traffic rules: Gateway API mesh routes (HTTPRoute, GRPCRoute with a Service parent) and the
sidemesh ``TrafficPolicy``, parsed, resolved against the mesh and compiled to Envoy (pure)."""
