"""End-to-end tests: a meshed pod pair in network namespaces with real Envoy and iptables."""
