"""ONNX -> TVM Relax -> kernels -> library: import, Relax rewrites (int8 lowering, channel padding),
the project's CPU schedules, MetaSchedule tuning, one build sequence (``build.build_model``) and one export."""
