"""`clover demo`: a small real service mesh on this machine, a bad rollout, and the pipeline
detecting it and rolling it back.

Modules: :mod:`demo.mesh` (the services, who calls whom, what each version does),
:mod:`demo.service` (one service process), :mod:`demo.exporters` (spans as a sidecar reports
them: OTLP, Zipkin, Mixer), :mod:`demo.runner` (plays the kubelet: runs the process version each
pod's image names), :mod:`demo.loadgen` (steady traffic), :mod:`demo.pipeline` (Clover's
components as subprocesses, tuned for the demo), :mod:`demo.timeline` (what the pipeline
decided, read back from Kafka) and :mod:`demo.scenario` (the whole run).
"""
