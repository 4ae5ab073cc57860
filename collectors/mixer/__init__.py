"""Clover's Istio Mixer out-of-process adapter (Istio 1.0-1.4): see :mod:`.server` for the
gRPC server and the mapping, :mod:`.generated` for the code generated from ``proto/``, and
``k8s/manifests/istio-mixer-adapter.yaml`` for the Istio configuration that feeds it."""
