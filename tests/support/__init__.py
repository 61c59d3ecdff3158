"""What tests share: clusters of real shims (shim_cluster, failover, live_peer), network
namespaces (netns), model files written or opened for engine tests (tiny_model, stage_model),
llama.cpp's teacher-forced goldens (teacher), local wheels for pulls (wheels), and the
discovery node script (discovery_node). Tests import them as ``support.NAME``."""
